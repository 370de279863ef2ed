"""Supervised fine-tuning (cold start) on the Megatron actor: loss on assistant (response) tokens only.

Run: ``tapo sft --config recipe.yaml [overrides]``. Data: the arithmetic task's gold solutions (demo), or a JSONL
of {"prompt": str, "response": str} rows (e.g. from ``tapo coldstart build``), tokenised with the chat template;
bad rows (not UTF-8, not JSON, missing/empty/non-string prompt or response) are reported as ``file:line`` and skipped
or refused by ``data.on_bad_row``. TP/PP come from the ``parallel`` section (the actor's layout).

Batching: right-padded global batches, loss on response tokens only (``collate_sft``). With
``sft.length_bucketing`` the examples are sorted by length into batches (batch order shuffled), which cuts padding.
There is no sequence packing: Megatron's local (non-TE) attention spec has no packed-sequence (THD / cu_seqlens)
support, and packing rows without it would let examples attend to each other.
The result is a checkpoint that starts an RL run (``checkpoint.pretrained_checkpoint``).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from tapo_megatron.algorithms.losses import sft_loss
from tapo_megatron.config import ConfigError, TrainConfig, to_dict
from tapo_megatron.convert.checkpoints import has_checkpoint
from tapo_megatron.data.queries import BadRow, DataError
from tapo_megatron.data.tokenizer import load_tokenizer
from tapo_megatron.logging.tracker import MetricsLogger
from tapo_megatron.models.qwen3 import shape_from_config
from tapo_megatron.parallel import setup_parallel
from tapo_megatron.runguard import RunGuard
from tapo_megatron.tasks import build_task
from tapo_megatron.training.actor import MegatronActor


def sft_examples(cfg: TrainConfig) -> tuple[list[tuple[list[int], list[int]]], object]:
    """(prompt_ids, response_ids incl. eos) pairs and the tokenizer: rows of ``sft.data_file`` in the chat
    format, or, with no file, the task's own SFT data (the arithmetic task writes gold and reflective solutions)."""
    if not cfg.sft.data_file:
        task = build_task(cfg.data, cfg.model, cfg.seed)
        if task.sft_examples is None:
            raise ConfigError(f"sft.data_file is empty and the {task.name!r} task writes no SFT data of its own: "
                              "give sft.data_file (e.g. the output of `tapo coldstart build`)")
        n = cfg.sft.global_batch_size * cfg.sft.train_iters
        return task.sft_examples(n, cfg.seed, cfg.sft.reflective_fraction), task.tokenizer
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    rows, bad = read_sft_rows(cfg.sft.data_file, cfg.data.on_bad_row)
    if bad:
        print(f"[sft] skipped {len(bad)} bad row(s) of {cfg.sft.data_file}; first: {bad[0]}", flush=True)
    if not rows:
        raise DataError(f"{cfg.sft.data_file}: no usable SFT rows")
    return [(tokenizer.chat_prompt_ids(p), tokenizer.encode(r) + [tokenizer.eos_id]) for p, r in rows], tokenizer


def read_sft_rows(path: str, on_error: str = "skip") -> tuple[list[tuple[str, str]], list[BadRow]]:
    """(prompt, response) texts of a JSONL file and its bad rows; ``on_error="raise"`` raises ``DataError``
    ("path:line: reason") at the first bad row instead."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"data.on_bad_row must be 'skip' or 'raise', got {on_error!r}")
    rows, bad = [], []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            reason = None
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    reason = f"expected a JSON object, got {type(row).__name__}"
                else:
                    for name in ("prompt", "response"):
                        if not isinstance(row.get(name), str) or not row[name].strip():
                            reason = f"field {name!r} must be a non-empty string"
                            break
            except UnicodeDecodeError as e:
                reason = f"not valid UTF-8 (byte {e.start})"
            except json.JSONDecodeError as e:
                reason = f"not valid JSON ({e.msg} at column {e.colno})"
            if reason is not None:
                if on_error == "raise":
                    raise DataError(BadRow(Path(path), line_no, reason))
                bad.append(BadRow(Path(path), line_no, reason))
                continue
            rows.append((row["prompt"], row["response"]))
    return rows, bad


def length_buckets(pairs, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices cut into batches of similar total length, batches in a seeded random order.

    Ties in length keep a seeded random order, so repeated runs give the same batches. The last batch may be short.
    """
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # stable: ties stay shuffled
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed + 1).shuffle(batches)
    return batches


def collate_sft(pairs, pad_id: int, max_tokens: int = 0) -> dict[str, torch.Tensor]:
    lengths = [len(p) + len(r) for p, r in pairs]
    if max_tokens and max(lengths) > max_tokens:  # refused here, not as a failure inside the actor
        raise DataError(f"an SFT example has {max(lengths)} tokens, over parallel.max_tokens_per_micro_batch="
                        f"{max_tokens}; raise the budget or drop longer examples")
    seq_len = max(lengths)
    tokens = torch.full((len(pairs), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), seq_len))
    for i, (p, r) in enumerate(pairs):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p):len(p) + len(r)] = 1.0
    return {"tokens": tokens, "loss_mask": mask, "lengths": torch.tensor(lengths)}


def run_sft(cfg: TrainConfig, on_step=None) -> MegatronActor:
    """SFT per ``cfg``; resumes from ``checkpoint.save`` when it holds a checkpoint. Stopped by SIGTERM, SIGUSR1 or
    SIGINT it saves and returns early with ``actor.preempted`` set (the CLI then exits PREEMPTED_EXIT_CODE)."""
    guard = RunGuard.start(cfg)  # directory lock, stale .tmp removed, stop signals -> save and stop
    shape = shape_from_config(cfg.model)
    ctx = setup_parallel(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                         cfg.seed, **shape.layout_dims())
    actor = MegatronActor(shape, ctx, cfg.sft.optimizer, cfg.parallel, cfg.model.params_dtype,
                          cfg.model.kernel_backend, cfg.model.logprobs_path, cfg.megatron)
    state = {"cursor": 0}
    if cfg.checkpoint.save and has_checkpoint(cfg.checkpoint.save):
        state = actor.load_checkpoint(cfg.checkpoint.save)
    elif cfg.checkpoint.pretrained_checkpoint:  # the cold start fine-tunes the base model, not a random init
        actor.load_model_weights(cfg.checkpoint.pretrained_checkpoint)
    pairs, tokenizer = sft_examples(cfg)
    random.Random(cfg.seed).shuffle(pairs)
    logger = MetricsLogger(cfg.logging.output_dir, run_name=cfg.logging.run_name or "sft", config=to_dict(cfg),
                           wandb_mode=cfg.logging.wandb_mode, project=cfg.logging.wandb_project,
                           resume=actor.iteration > 0, resume_step=actor.iteration if actor.iteration > 0 else None
                           ) if ctx.is_main else None
    gbs = cfg.sft.global_batch_size
    buckets = length_buckets(pairs, gbs, cfg.seed) if cfg.sft.length_bucketing else None
    bar = tqdm(range(actor.iteration, cfg.sft.train_iters), desc="sft",
               disable=not (ctx.is_main and cfg.logging.progress_bar))
    for step in bar:
        if buckets:  # the step number picks the batch, so a resumed run continues the same sequence
            chunk = [pairs[i] for i in buckets[step % len(buckets)]]
        else:
            start = state["cursor"] % len(pairs)
            chunk = (pairs[start:] + pairs)[:gbs]
            state["cursor"] = start + gbs
        tensors = collate_sft(chunk, tokenizer.pad_id, cfg.parallel.max_tokens_per_micro_batch)
        num_tokens = float(tensors["loss_mask"].sum())
        result = actor.train_step(tensors, lambda lp, mb: (sft_loss(lp, mb["loss_mask"], num_tokens), {}))
        if logger:
            logger.log(step + 1, {"sft/loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr})
            bar.set_postfix(loss=f"{result.loss:.3f}")
        if on_step is not None and on_step(step + 1, actor):  # the callback may stop training early
            break
        if cfg.checkpoint.save and cfg.checkpoint.save_interval and (step + 1) % cfg.checkpoint.save_interval == 0:
            actor.save_checkpoint(cfg.checkpoint.save, state, cfg.checkpoint.keep_last)
        if guard.stop_requested(ctx):
            break
    if cfg.checkpoint.save:
        actor.save_checkpoint(cfg.checkpoint.save, state, cfg.checkpoint.keep_last)
    if logger:
        logger.close()
    guard.close()
    actor.preempted = guard.preempted
    return actor
