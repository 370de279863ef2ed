"""Supervised fine-tuning (cold start) on the Megatron actor: loss on assistant (response) tokens only.

Run: ``tapo sft --config recipe.yaml [overrides]``. Data: the arithmetic task's gold solutions (demo), or a JSONL
of {"prompt": str, "response": str} rows (e.g. from ``tapo coldstart build``), tokenised with the chat template.
The result is a checkpoint that starts an RL run (``checkpoint.pretrained_checkpoint``).
"""
from __future__ import annotations

import json
import random

import torch
from tqdm import tqdm

from tapo_megatron import builders
from tapo_megatron.algorithms.losses import sft_loss
from tapo_megatron.config import TrainConfig, to_dict
from tapo_megatron.logging.tracker import MetricsLogger
from tapo_megatron.tasks.arithmetic import ArithmeticTask
from tapo_megatron.training.actor import MegatronActor, has_checkpoint


def sft_examples(cfg: TrainConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids incl. eos) pairs."""
    n = cfg.sft.global_batch_size * cfg.sft.train_iters
    if not cfg.sft.data_file:
        return ArithmeticTask().sft_examples(n, cfg.seed, reflective_fraction=cfg.sft.reflective_fraction)
    pairs = []
    with open(cfg.sft.data_file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, response = row["prompt"], row["response"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{cfg.sft.data_file}:{line_no}: bad SFT row ({e})") from None
            pairs.append((tokenizer.chat_prompt_ids(prompt), tokenizer.encode(response) + [tokenizer.eos_id]))
    if not pairs:
        raise ValueError(f"{cfg.sft.data_file}: no SFT rows")
    return pairs


def collate_sft(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    seq_len = max(len(p) + len(r) for p, r in pairs)
    tokens = torch.full((len(pairs), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), seq_len))
    for i, (p, r) in enumerate(pairs):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p):len(p) + len(r)] = 1.0
    return {"tokens": tokens, "loss_mask": mask}


def run_sft(cfg: TrainConfig, on_step=None) -> MegatronActor:
    shape = builders.model_shape(cfg.model)
    ctx = builders.setup_parallel(cfg, shape)
    tokenizer = builders.build_tokenizer(cfg.model)
    actor = MegatronActor(shape, ctx, cfg.sft.optimizer, cfg.parallel, cfg.model.params_dtype,
                          cfg.model.kernel_backend)
    state = {"cursor": 0}
    if cfg.checkpoint.save and has_checkpoint(cfg.checkpoint.save):
        state = actor.load_checkpoint(cfg.checkpoint.save)
    pairs = sft_examples(cfg, tokenizer)
    random.Random(cfg.seed).shuffle(pairs)
    logger = MetricsLogger(cfg.logging.output_dir, run_name=cfg.logging.run_name or "sft", config=to_dict(cfg),
                           wandb_mode=cfg.logging.wandb_mode, project=cfg.logging.wandb_project,
                           resume=actor.iteration > 0) if ctx.is_main else None
    gbs = cfg.sft.global_batch_size
    bar = tqdm(range(actor.iteration, cfg.sft.train_iters), desc="sft",
               disable=not (ctx.is_main and cfg.logging.progress_bar))
    for step in bar:
        start = state["cursor"] % len(pairs)
        chunk = (pairs[start:] + pairs)[:gbs]
        state["cursor"] = start + gbs
        tensors = collate_sft(chunk, tokenizer.pad_id)
        num_tokens = float(tensors["loss_mask"].sum())
        result = actor.train_step(tensors, lambda lp, mb: (sft_loss(lp, mb["loss_mask"], num_tokens), {}))
        if logger:
            logger.log(step + 1, {"sft/loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr})
            bar.set_postfix(loss=f"{result.loss:.3f}")
        if on_step is not None and on_step(step + 1, actor):  # the callback may stop training early
            break
        if cfg.checkpoint.save and cfg.checkpoint.save_interval and (step + 1) % cfg.checkpoint.save_interval == 0:
            actor.save_checkpoint(cfg.checkpoint.save, state)
    if cfg.checkpoint.save:
        actor.save_checkpoint(cfg.checkpoint.save, state)
    if logger:
        logger.close()
    return actor
