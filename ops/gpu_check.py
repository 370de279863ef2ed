"""``make gpu-check``: the GPU targets on one H100/H200 in a few minutes, with only torch, Triton and megatron-core.

    python ops/gpu_check.py [--out runs/gpu_check.json]      # on the GPU machine (make gpu-check)
    python ops/gpu_check.py --dry --out /tmp/x.json          # CPU, tiny shapes: the test suite runs this

Nothing else needs installing there: this checkout is put on ``sys.path`` (``kernels/`` is loaded as
``tapo_kernels``), megatron-core comes from a wheel (``make gpu-wheel`` fetches it into ``.whl/``; ``make
gpu-check`` puts it in ``.gpu-site/``), transformers is the machine's own. Transformer Engine and SGLang are not
used (they cannot be carried there): the actor runs Megatron's local spec.

Measured, one JSON (``--out``) and one PASS/FAIL line per target:
1. ``kernel_parity_T*``: ``tapo_kernels.masked_logprobs`` (Triton) against ``F.cross_entropy`` on the same bf16
   logits upcast to fp32 and Megatron's ``vocab_parallel_cross_entropy``: log-prob values and d/dlogits.
2. ``kernel_speed_T*`` / ``kernel_memory_T*``: forward+backward time and peak extra memory of ours vs
   ``F.cross_entropy(logits.float())`` (the strongest plain-torch baseline) and Megatron's, V = 151,936,
   T in {4,096, 16,384}, all three timed in one process, interleaved.
3. ``train_step``: ``MegatronActor.train_step`` on the Qwen3-0.6B shape, bf16: tokens/s and MFU (6 N + attention
   FLOPs per token against the GPU's dense bf16 peak).
4. ``weight_sync``: a colocated ``TensorWeightSync`` into an in-process HF engine (``NativeEngine`` on the same GPU):
   GB/s, and the engine's weights afterwards equal the actor's.
The target values are this script's (``TARGETS``), set before any run; where a target is a speed, the dry mode
reports it as SKIP (CPU timings of tiny shapes say nothing about an H100).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TARGETS = {
    "logprob_abs_err": 2e-3,  # fp32 log-probs from the same bf16 logits
    "grad_rel_err": 1e-2,  # d/dlogits is stored in bf16: error over the largest |gradient|
    "kernel_speedup_vs_cross_entropy": 1.0,  # ours at least as fast as F.cross_entropy(logits.float())
    "kernel_memory_ratio_vs_cross_entropy": 0.5,  # at most half its peak extra memory
    "train_mfu": 0.20,
    "sync_gb_per_s": 10.0,
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}  # dense, SXM


def _import_repo():
    """This checkout importable without installing it: the repo on sys.path, ``kernels/`` as ``tapo_kernels``."""
    sys.path.insert(0, str(REPO))
    site = REPO / ".gpu-site"
    if site.is_dir():
        sys.path.insert(0, str(site))
    try:
        import tapo_kernels  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location("tapo_kernels", REPO / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["tapo_kernels"] = module
        spec.loader.exec_module(module)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(fn, device, iters: int, setup=lambda: ()) -> tuple[float, int]:
    """(median seconds, peak extra bytes) of ``fn(*setup())``; ``setup`` (fresh inputs) is outside both."""
    import torch

    _sync(device)
    fn(*setup())  # warm-up: Triton compiles here
    _sync(device)
    times, peak = [], 0
    for _ in range(iters):
        args = setup()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
    return statistics.median(times), peak


def check_kernels(device, vocab: int, tokens: list[int], iters: int, dry: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from tapo_kernels import masked_logprobs

    out = {}
    for T in tokens:
        g = torch.Generator(device=device).manual_seed(T)
        base = (torch.randn(T, vocab, generator=g, device=device) * 2.0).to(torch.bfloat16)
        targets = torch.randint(0, vocab, (T,), generator=g, device=device)
        weights = torch.rand(T, generator=g, device=device) * 2 - 1

        def leaf():  # a fresh bf16 leaf per call, made outside the timed and measured region
            return (base.detach().clone().requires_grad_(True),)

        def ours(x):
            lp = masked_logprobs(x, targets, None, backend="triton")
            (lp * weights).sum().backward()
            return lp.detach(), x.grad

        def cross_entropy(x):
            lp = -F.cross_entropy(x.float(), targets, reduction="none")
            (lp * weights).sum().backward()
            return lp.detach(), x.grad

        def megatron(x):  # [s, b, V] layout; it overwrites its input, hence the fp32 copy
            lp = -vocab_parallel_cross_entropy(x.float()[:, None, :], targets[:, None])[:, 0]
            (lp * weights).sum().backward()
            return lp.detach(), x.grad

        (lp_o, g_o), (lp_c, g_c), (lp_m, g_m) = ours(*leaf()), cross_entropy(*leaf()), megatron(*leaf())
        scale = g_c.float().abs().max().item()  # bf16 gradients: compare relative to the largest entry
        errs = {"logprob_vs_cross_entropy": (lp_o - lp_c).abs().max().item(),
                "logprob_vs_megatron": (lp_o - lp_m).abs().max().item(),
                "grad_vs_cross_entropy": (g_o.float() - g_c.float()).abs().max().item() / scale,
                "grad_vs_megatron": (g_o.float() - g_m.float()).abs().max().item() / scale}
        ok = (max(errs["logprob_vs_cross_entropy"], errs["logprob_vs_megatron"]) <= TARGETS["logprob_abs_err"]
              and max(errs["grad_vs_cross_entropy"], errs["grad_vs_megatron"]) <= TARGETS["grad_rel_err"])
        out[f"kernel_parity_T{T}"] = {"pass": ok, **errs, "vocab": vocab, "dtype": "bfloat16"}
        del lp_o, g_o, lp_c, g_c, lp_m, g_m
        timing = {}
        for _ in range(iters):  # interleaved, so the three see the same machine
            for name, fn in (("ours", ours), ("cross_entropy", cross_entropy), ("megatron", megatron)):
                s, peak = _measure(fn, device, 1, setup=leaf)
                timing.setdefault(name, []).append((s, peak))
        med = {k: (statistics.median(s for s, _ in v), max(p for _, p in v)) for k, v in timing.items()}
        speedup = med["cross_entropy"][0] / med["ours"][0]
        mem_ratio = med["ours"][1] / med["cross_entropy"][1] if med["cross_entropy"][1] else None
        common = {f"{k}_ms": round(1e3 * v[0], 3) for k, v in med.items()}
        common.update({f"{k}_peak_extra_mib": round(v[1] / 2**20, 1) for k, v in med.items()})
        out[f"kernel_speed_T{T}"] = {"pass": None if dry else speedup >= TARGETS["kernel_speedup_vs_cross_entropy"],
                                     "speedup_vs_cross_entropy": round(speedup, 3),
                                     "speedup_vs_megatron": round(med["megatron"][0] / med["ours"][0], 3), **common}
        out[f"kernel_memory_T{T}"] = {
            "pass": None if dry or mem_ratio is None else mem_ratio <= TARGETS["kernel_memory_ratio_vs_cross_entropy"],
            "ratio_vs_cross_entropy": None if mem_ratio is None else round(mem_ratio, 3),
            "ratio_vs_megatron": (round(med["ours"][1] / med["megatron"][1], 3) if med["megatron"][1] else None)}
        del base
    return out


def _peak_tflops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def check_train_and_sync(device, shape_cfg: dict, batch: int, seq: int, micro: int, iters: int, dry: bool) -> dict:
    import torch

    from tapo_megatron.config import OptimizerConfig, ParallelConfig
    from tapo_megatron.models.qwen3 import Qwen3Shape
    from tapo_megatron.parallel import init_parallel
    from tapo_megatron.rollout.native import NativeEngine
    from tapo_megatron.training.actor import MegatronActor
    from tapo_megatron.training.weight_sync import TensorWeightSync, gather_hf_state

    shape = Qwen3Shape.from_hf(shape_cfg)
    ctx = init_parallel(1, 1, seed=0)  # idempotent: the groups main() made
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    actor = MegatronActor(shape, ctx, OptimizerConfig(lr=1e-6), ParallelConfig(micro_batch_size=micro), dtype)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq)
    n_tokens = float(mask.sum())

    def loss_fn(lp, mb):  # normalised by the global token count (LossFn)
        return -(lp * mb["mask"]).sum() / n_tokens, {}

    def step():
        actor.train_step({"tokens": tokens, "mask": mask}, loss_fn)

    seconds, peak = _measure(step, device, iters)
    tok_s = batch * seq / seconds
    n = shape.num_parameters()
    flops_per_token = 6 * n + 12 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_dim * seq
    peak_tf = _peak_tflops(device)
    mfu = tok_s * flops_per_token / (peak_tf * 1e12) if peak_tf else None
    out = {"train_step": {"pass": None if dry or mfu is None else mfu >= TARGETS["train_mfu"],
                          "tokens_per_s": round(tok_s, 1), "mfu": None if mfu is None else round(mfu, 4),
                          "seconds_per_step": round(seconds, 4), "params": n, "batch": batch, "seq": seq,
                          "micro_batch": micro, "peak_extra_gib": round(peak / 2**30, 2), "dtype": dtype,
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}}
    engine = NativeEngine(shape.to_hf(), dtype=getattr(torch, dtype), device=device)
    sync = TensorWeightSync(actor.module, ctx, engine, 256 * 2**20)
    stats = [sync.sync(v) for v in range(1, 1 + max(2, iters))]
    s = statistics.median(x.seconds for x in stats[1:])
    gbps = stats[-1].bytes / 1e9 / s
    actor_state = gather_hf_state(actor)
    engine_state = engine._model.state_dict()
    same = all(torch.equal(engine_state[k].cpu(), v.to(engine_state[k].dtype)) for k, v in actor_state.items()
               if k in engine_state)
    out["weight_sync"] = {"pass": same and (True if dry else gbps >= TARGETS["sync_gb_per_s"]),
                          "gb_per_s": round(gbps, 3), "gb": round(stats[-1].bytes / 1e9, 4),
                          "seconds_per_sync": round(s, 4), "engine_weights_equal_actor": same,
                          "speed_checked": not dry}
    return out


DRY_SHAPE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True,
             "max_position_embeddings": 128}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes (Triton interpreted): the suite's check")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check.json"))
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    _import_repo()
    import torch

    t0 = time.perf_counter()
    if args.dry:
        device, vocab, tokens = torch.device("cpu"), 512, [8, 16]
        shape, batch, seq, micro = DRY_SHAPE, 2, 16, 1
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("FAIL no CUDA device (use --dry for the CPU check)")
            return 1
        from tapo_megatron.models.hf_config import qwen3_preset

        device, vocab, tokens = torch.device("cuda", 0), 151_936, [4096, 16384]
        torch.cuda.set_device(device)
        shape, batch, seq, micro = qwen3_preset("Qwen3-0.6B"), 8, 2048, 2
    from tapo_megatron.parallel import init_parallel

    init_parallel(1, 1, seed=0)  # Megatron's cross entropy and the actor need the (single-rank) groups
    results = {"dry": args.dry, "targets": TARGETS, "torch": torch.__version__}
    results.update(check_kernels(device, vocab, tokens, args.iters, args.dry))
    results.update(check_train_and_sync(device, shape, batch, seq, micro, args.iters, args.dry))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    lines, failed = verdicts(results)
    print("\n".join(lines))
    print(f"wrote {out} in {results['seconds']} s")
    return 1 if failed else 0


def verdicts(results: dict) -> tuple[list[str], bool]:
    """One ``PASS|FAIL|SKIP name: details`` line per target; True when any target failed."""
    lines, failed = [], False
    for name, r in results.items():
        if isinstance(r, dict) and "pass" in r:
            verdict = "SKIP (dry run: not a speed measurement)" if r["pass"] is None else "PASS" if r["pass"] else "FAIL"
            failed |= r["pass"] is False
            lines.append(f"{verdict} {name}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "pass"))
    return lines, failed


if __name__ == "__main__":
    sys.exit(main())
