"""``tapo bench engine``: native-engine generation throughput against HF transformers' own ``generate`` on the same
model, prompts and token counts, measured in one run (the baseline a user would otherwise reach for on CPU).

    tapo bench engine [--batch 128] [--new-tokens 32] [--threads 1] [--repeats 3]

Model: the demo's shape (0.79 M params, hidden 128, 4 layers) with peaked random weights; 16-token prompts,
sampling at T = 1 with no stop token, so both sides produce exactly batch x new-tokens tokens. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DEMO_SHAPE = dict(vocab_size=32, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, max_position_embeddings=256)


def main(argv: list[str] | None = None) -> dict:
    from tapo_megatron.records import SamplingParams
    from tapo_megatron.rollout.native import NativeEngine

    p = argparse.ArgumentParser(prog="tapo bench engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = NativeEngine(DEMO_SHAPE, seed=0, num_threads=args.threads)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peaked weights: the default init gives near-uniform logits
        for param in engine.model.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.15)
    prompts = torch.randint(0, DEMO_SHAPE["vocab_size"], (args.batch, 16), generator=g)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    tokens = args.batch * args.new_tokens

    def ours() -> float:
        t = time.perf_counter()
        out = engine.generate(prompts.tolist(), params)
        assert sum(len(x.token_ids) for x in out) == tokens
        return time.perf_counter() - t

    def hf() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            engine.model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
        return time.perf_counter() - t

    ours(), hf()  # warm-up
    times = {"native": [], "hf_generate": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        times["native"].append(ours())
        times["hf_generate"].append(hf())
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"batch": args.batch, "new_tokens": args.new_tokens, "threads": args.threads,
              "native_tok_s": tokens / med["native"], "hf_generate_tok_s": tokens / med["hf_generate"],
              "speedup_vs_hf_generate": med["hf_generate"] / med["native"]}
    print(json.dumps(report))
    return report
