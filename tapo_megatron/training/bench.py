"""``tapo bench train``: the training side of an RL step and an SFT step, each against its baseline in one run.

    tapo bench train [--recipe demo] [--repeats 5] [--skip-sft] [--json bench_train.json]

1. **RL step, old path vs new**, on one real rollout batch of the recipe (native engine, the recipe's model at
   random init, the real builder; all-wrong groups are kept, with advantage 0, so the batch has the recipe's
   K x M rows; a random policy gives no constructions):
   - old: right-padded to the batch's longest row, ``parallel.micro_batch_size`` rows per micro-batch, a separate
     old-log-prob + entropy forward, then the training forward/backward (what the trainer did before the token
     budget and the one-forward step);
   - new: rows trimmed per micro-batch under ``parallel.max_tokens_per_micro_batch`` (the recipe's value, else
     ``--max-tokens``) and one forward: old log-probs and OTS inputs detached from the training forward.
   Both start from the same weights on two actors, interleaved (order alternating), median over repeats. The full
   step ratio adds the measured generation, reward and build time (the same for both) to each side.
2. **SFT step, Megatron actor vs HF transformers** on the same model (weights copied), the same batches and the
   same loss (token mean over response tokens), Adam with the same settings; interleaved, median.

Prints one line per part and writes JSON. Timings depend on the machine's load: run on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rollout_batch(cfg):
    """One real rollout batch of the recipe: trajectories, and the generate/reward/build seconds."""
    from tapo_megatron.data.stream import QueryStream
    from tapo_megatron.models.qwen3 import shape_from_config
    from tapo_megatron.rewards import score_rollouts
    from tapo_megatron.rollout.build import build_engine
    from tapo_megatron.rollout.sampling import rollout_sampling, sample_groups
    from tapo_megatron.tasks import build_task
    from tapo_megatron.trajectory.builder import TrajectoryBuilder
    from tapo_megatron.trajectory.constructors import build_constructor

    shape = shape_from_config(cfg.model)
    task = build_task(cfg.data, cfg.model, cfg.seed)
    engine = build_engine(cfg.rollout, shape, cfg.seed)
    queries = QueryStream(task.train, cfg.seed).next_batch(cfg.rollout.rollout_batch_size)
    t0 = time.perf_counter()
    params = rollout_sampling(cfg.rollout, task.tokenizer.eos_id, seed=cfg.seed)
    rollouts = sample_groups(engine, queries, cfg.rollout.n_samples_per_prompt, params, task.tokenizer)
    t1 = time.perf_counter()
    score_rollouts(rollouts, queries, task.reward)
    t2 = time.perf_counter()
    constructor = build_constructor(cfg.tapo, engine=engine, tokenizer=task.tokenizer,
                                    step_verifier=task.step_verifier) if cfg.tapo.enabled else None
    builder = TrajectoryBuilder(cfg.tapo, cfg.algorithm, task.tokenizer, task.reward, constructor, seed=cfg.seed)
    built = builder.build(queries, rollouts, 0)
    t3 = time.perf_counter()
    return shape, task, built.trajectories, {"generate": t1 - t0, "reward": t2 - t1, "build": t3 - t2}


def bench_rl(cfg, repeats: int, max_tokens: int) -> dict:
    from dataclasses import replace

    from tapo_megatron.parallel import setup_parallel
    from tapo_megatron.training.actor import MegatronActor
    from tapo_megatron.training.batch import batch_tensors, collate, fill_policy_tensors, make_policy_loss_fn
    from tapo_megatron.training.step import policy_step

    shape, task, trajectories, rollout_times = _rollout_batch(cfg)
    if not trajectories:
        raise RuntimeError("the rollout batch produced no trajectories with signal; try another --seed")
    ctx = setup_parallel(1, 1, cfg.seed, **shape.layout_dims())
    budget = cfg.parallel.max_tokens_per_micro_batch or max_tokens
    old_par = replace(cfg.parallel, max_tokens_per_micro_batch=0)
    new_par = replace(cfg.parallel, max_tokens_per_micro_batch=budget)
    actors = {name: MegatronActor(shape, ctx, cfg.optimizer, par, cfg.model.params_dtype, cfg.model.kernel_backend)
              for name, par in (("old", old_par), ("new", new_par))}
    actors["new"].module.load_state_dict(actors["old"].module.state_dict())
    actors["new"]._reload_main_params()
    pad_id, prefix = task.tokenizer.pad_id, cfg.tapo.train_constructed_prefix
    pads = {}

    def old():
        batch = collate(trajectories, pad_id, prefix)
        pads["old"] = 1 - float(batch.seq_lengths.sum()) / batch.tokens.numel()
        batch.seq_lengths = None  # full-width rows: the padded path
        fill_policy_tensors(batch, actors["old"], cfg.tapo)
        actors["old"].train_step(batch_tensors(batch), make_policy_loss_fn(batch, cfg.algorithm, cfg.tapo))

    def new():
        batch = collate(trajectories, pad_id, prefix, budget)
        metrics, _ = policy_step(actors["new"], batch, cfg.algorithm, cfg.tapo, None, 0)
        pads["new"] = metrics["batch/pad_fraction"]

    old(), new()  # warm-up
    med = _interleaved({"old": old, "new": new}, repeats)
    rollout = sum(rollout_times.values())
    report = {"trajectories": len(trajectories), "max_tokens_per_micro_batch": budget,
              "micro_batch_size": cfg.parallel.micro_batch_size, "train_s": med, "pad_fraction": pads,
              "train_speedup": med["old"] / med["new"], "rollout_s": rollout_times,
              "step_speedup": (rollout + med["old"]) / (rollout + med["new"]), "target_train_speedup": 1.3}
    print(f"[bench train: RL step] {len(trajectories)} trajectories | train part old {med['old']:.2f} s "
          f"(pad {pads['old']:.1%}, 2 forwards) vs new {med['new']:.2f} s (pad {pads['new']:.1%}, 1 forward, "
          f"budget {budget}) = {report['train_speedup']:.2f}x | whole step with generate/reward/build "
          f"{rollout:.2f} s: {report['step_speedup']:.2f}x", flush=True)
    return report


def bench_sft(cfg, repeats: int) -> dict:
    """Megatron actor vs HF transformers, one SFT optimizer step on the same batch."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tapo_megatron.algorithms.losses import sft_loss
    from tapo_megatron.models.qwen3 import shape_from_config
    from tapo_megatron.parallel import setup_parallel
    from tapo_megatron.sft import collate_sft, sft_examples
    from tapo_megatron.training.actor import MegatronActor
    from tapo_megatron.training.weight_sync import gather_hf_state

    shape = shape_from_config(cfg.model)
    ctx = setup_parallel(1, 1, cfg.seed, **shape.layout_dims())
    pairs, tokenizer = sft_examples(cfg)
    batch = collate_sft(pairs[:cfg.sft.global_batch_size], tokenizer.pad_id)
    n_tokens = float(batch["loss_mask"].sum())
    actor = MegatronActor(shape, ctx, cfg.sft.optimizer, cfg.parallel, cfg.model.params_dtype,
                          cfg.model.kernel_backend)
    hf_cfg = Qwen3Config(**{k: v for k, v in shape.to_hf().items() if k not in ("architectures", "torch_dtype")})
    hf = Qwen3ForCausalLM(hf_cfg)
    hf.load_state_dict(gather_hf_state(actor), strict=False)
    o = cfg.sft.optimizer
    hf_opt = torch.optim.Adam(hf.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    tokens, mask = batch["tokens"], batch["loss_mask"]
    attn = (torch.arange(tokens.shape[1])[None] < batch["lengths"][:, None]).long()

    def megatron():
        actor.train_step(batch, lambda lp, mb: (sft_loss(lp, mb["loss_mask"], n_tokens), {}))

    def transformers():
        hf_opt.zero_grad()
        logits = hf(input_ids=tokens, attention_mask=attn).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        loss = -(lp * mask[:, 1:]).sum() / n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), o.clip_grad)
        hf_opt.step()

    megatron(), transformers()
    med = _interleaved({"megatron": megatron, "transformers": transformers}, repeats)
    ratio = med["megatron"] / med["transformers"]
    report = {"batch": len(tokens), "tokens": int(batch["lengths"].sum()), "width": tokens.shape[1], "step_s": med,
              "megatron_over_hf": ratio, "target_megatron_over_hf": 1.1}
    print(f"[bench train: SFT step] {len(tokens)} rows: Megatron {med['megatron'] * 1e3:.0f} ms vs HF transformers "
          f"{med['transformers'] * 1e3:.0f} ms = {ratio:.2f}x", flush=True)
    return report


def main(argv: list[str] | None = None) -> dict:
    from tapo_megatron.recipes import load_recipe

    p = argparse.ArgumentParser(prog="tapo bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="demo")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget when the recipe sets none")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-sft", action="store_true")
    p.add_argument("--json", default="bench_train.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # a random-init policy solves nothing: keep the all-wrong groups (advantage 0) so the batch has the recipe's size
    cfg = load_recipe(args.recipe, overrides=["logging.wandb_mode=disabled",
                                              "algorithm.drop_zero_variance_groups=false"])
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "load_avg_1m": os.getloadavg()[0], "threads": args.threads, "torch": torch.__version__},
              "recipe": args.recipe, "rl": bench_rl(cfg, args.repeats, args.max_tokens)}
    if not args.skip_sft:
        report["sft"] = bench_sft(cfg, args.repeats)
    report["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"results written to {args.json}", flush=True)
    return report
