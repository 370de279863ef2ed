"""The RL loop (GRPO, or TAPO when ``tapo.enabled``): one screen of named calls, one stage each.

    rollout -> reward -> trajectory builder (DCS, construction, splicing, DAE) -> old log-probs + OTS weights
            -> actor step (PPO-clip, token-mean) -> weight sync to the engine -> log / eval / checkpoint

Run: ``tapo train --config recipe.yaml [section.field=value ...]`` (single process or under torchrun).
"""
from __future__ import annotations

import time

import torch.distributed as dist
from tqdm import tqdm

from tapo_megatron import builders
from tapo_megatron.config import TrainConfig, to_dict
from tapo_megatron.data.stream import QueryStream
from tapo_megatron.evaluation import evaluate
from tapo_megatron.logging.tracker import MetricsLogger
from tapo_megatron.records import Rollout, SamplingParams
from tapo_megatron.rewards import get_reward
from tapo_megatron.training.actor import MegatronActor, NonFiniteLossError, has_checkpoint
from tapo_megatron.training.batch import batch_tensors, collate, fill_policy_tensors, make_policy_loss_fn
from tapo_megatron.training.weight_sync import check_logprobs, make_weight_sync, probe_tokens
from tapo_megatron.trajectory.builder import TrajectoryBuilder
from tapo_megatron.trajectory.constructors import build_constructor


def generate_rollouts(engine, queries, rollout_cfg, tokenizer, step: int, seed: int) -> list[Rollout]:
    k = rollout_cfg.n_samples_per_prompt
    params = SamplingParams(temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
                            max_new_tokens=rollout_cfg.max_new_tokens, stop_token_ids=(tokenizer.eos_id,),
                            seed=seed * 100_003 + step)
    gens = engine.generate([q.prompt_ids for q in queries for _ in range(k)], params)
    return [Rollout(query_id=q.id, group_index=i, prompt_ids=q.prompt_ids, response_ids=g.token_ids,
                    engine_logprobs=g.logprobs, finish_reason=g.finish_reason, weight_version=g.weight_version,
                    response_text=tokenizer.decode(g.token_ids))
            for i, q in enumerate(queries) for g in gens[i * k:(i + 1) * k]]


def score_rollouts(rollouts: list[Rollout], queries, reward_fn) -> None:
    gold = {q.id: q.answer for q in queries}
    for r in rollouts:
        r.reward = reward_fn(r.response_text, gold[r.query_id])


def rollout_metrics(rollouts: list[Rollout]) -> dict:
    n = max(1, len(rollouts))
    return {"rollout/accuracy": sum(r.reward > 0.5 for r in rollouts) / n,
            "rollout/reward": sum(r.reward for r in rollouts) / n,
            "rollout/response_length": sum(len(r.response_ids) for r in rollouts) / n,
            "rollout/truncated": sum(r.finish_reason.value == "length" for r in rollouts) / n}


def _broadcast(obj, ctx):
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def export_hf(ckpt, cfg: TrainConfig):
    """Export the Megatron checkpoint ``ckpt`` (an ``iter_<N>`` dir) to ``cfg.checkpoint.export_hf`` (replaced if it
    exists), with the tokenizer from ``checkpoint.export_tokenizer`` or, when that is empty, ``model.tokenizer`` if
    it is a folder. Collective: every rank calls it (rank 0 writes, the others wait)."""
    from pathlib import Path

    from tapo_megatron.convert.cli import mcore_to_hf

    tokenizer_dir = cfg.checkpoint.export_tokenizer or (cfg.model.tokenizer if Path(cfg.model.tokenizer).is_dir()
                                                        else None)
    return mcore_to_hf(ckpt, cfg.checkpoint.export_hf, tokenizer_dir=tokenizer_dir, overwrite=True)


def build_weight_sync(cfg: TrainConfig, actor, engine):
    """The transport of ``rollout.weight_sync_mode`` (colocated / distributed / disk), connected."""
    servers = None
    if cfg.rollout.weight_sync_mode == "distributed":
        from tapo_megatron.rollout.sglang import EngineServer

        # Every trainer rank posts to the servers: rank 0 has the engine's; the others address the same URLs.
        servers = engine.servers if engine is not None else [EngineServer(url=u) for u in cfg.rollout.engine_urls]
    sync = make_weight_sync(cfg.rollout.weight_sync_mode, actor, engine,
                            int(cfg.rollout.weight_sync_bucket_mb * 2**20), servers=servers,
                            disk_root=cfg.rollout.weight_sync_dir,
                            master_address=cfg.rollout.weight_sync_master_address)
    sync.connect()
    return sync


def push_weights(weight_sync, cfg: TrainConfig, actor, engine, probes) -> dict:
    """(6) Sync the actor's weights into the engines as version ``actor.iteration``; optionally verify them."""
    metrics = weight_sync.sync(actor.iteration).as_metrics()
    if cfg.rollout.weight_sync_check == "logprobs":
        metrics["sync/check_max_abs_logprob"] = check_logprobs(actor, engine, probes,
                                                               cfg.rollout.weight_sync_check_atol)
    return metrics


MAX_SKIPPED_STEPS = 3  # non-finite steps in a row that mean training has diverged


def optimizer_step(actor, batch, cfg: TrainConfig, skipped_in_a_row: int) -> dict:
    """(5) One PPO-clip step. A non-finite loss or gradient skips the step (weights untouched) and is logged;
    ``MAX_SKIPPED_STEPS`` in a row stop the run with the error."""
    try:
        result = actor.train_step(batch_tensors(batch), make_policy_loss_fn(batch, cfg.algorithm, cfg.tapo))
    except NonFiniteLossError as err:
        if skipped_in_a_row + 1 >= MAX_SKIPPED_STEPS:
            raise
        print(f"[train] {err}", flush=True)
        actor.iteration += 1
        return {"skipped_nonfinite": 1.0}
    return {**result.metrics, "loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
            "skipped_nonfinite": 0.0}


def run_evals(engine, queries, reward_fn, tokenizer, cfg: TrainConfig) -> dict:
    metrics = {}
    for name, qs in queries.evals.items():
        summary = evaluate(engine, qs, reward_fn, tokenizer, n_samples=cfg.data.eval_samples,
                           max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed,
                           detector=builders.reflection_detector(cfg.data))
        metrics.update({f"eval/{name}/{k}": v for k, v in summary.items()})
    return metrics


def upload_curves(logger: MetricsLogger, title: str) -> None:
    """The run's curves as a PNG next to metrics.jsonl, uploaded to wandb as an image."""
    from tapo_megatron.logging.plots import plot_curves
    from tapo_megatron.logging.tracker import read_metrics

    png = plot_curves({logger.path.parent.name: read_metrics(logger.path)},
                      ["rollout/accuracy", "rollout/reward", "loss", "grad_norm", "rollout/response_length",
                       "entropy", "approx_kl", "ots_weight_mean", "tapo/num_candidates"],
                      logger.output_dir / "curves.png", title=title)
    logger.log_images({"curves": png})


def train(cfg: TrainConfig) -> dict:
    cfg.validate()
    shape = builders.model_shape(cfg.model)
    ctx = builders.setup_parallel(cfg, shape)
    tokenizer = builders.build_tokenizer(cfg.model)
    queries = builders.load_task_queries(cfg.data, tokenizer, cfg.seed)
    stream = QueryStream(queries.train, cfg.seed)
    actor = MegatronActor(shape, ctx, cfg.optimizer, cfg.parallel, cfg.model.params_dtype,
                          cfg.model.kernel_backend)
    # Resume from checkpoint.load, else from checkpoint.save when a previous (killed) run left one there.
    resume_from = cfg.checkpoint.load or (cfg.checkpoint.save if cfg.checkpoint.save and
                                          has_checkpoint(cfg.checkpoint.save) else "")
    if resume_from:
        stream.load_state(actor.load_checkpoint(resume_from)["stream"])
    elif cfg.checkpoint.pretrained_checkpoint:
        actor.load_model_weights(cfg.checkpoint.pretrained_checkpoint)
    engine = builders.build_engine(cfg.rollout, shape, cfg.seed) if ctx.is_main else None
    weight_sync = build_weight_sync(cfg, actor, engine)
    probes = probe_tokens(shape.vocab_size) if cfg.rollout.weight_sync_check == "logprobs" else None
    push_weights(weight_sync, cfg, actor, engine, probes)
    reward_fn = get_reward(cfg.data.reward)
    builder = None  # rollouts, construction and trajectory building happen on rank 0, next to the engine
    if ctx.is_main:
        constructor = build_constructor(cfg.tapo, engine=engine, tokenizer=tokenizer) if cfg.tapo.enabled else None
        builder = TrajectoryBuilder(cfg.tapo, cfg.algorithm, tokenizer, reward_fn, constructor, seed=cfg.seed)
    logger = MetricsLogger(cfg.logging.output_dir, run_name=cfg.logging.run_name or "rl", config=to_dict(cfg),
                           wandb_mode=cfg.logging.wandb_mode, project=cfg.logging.wandb_project,
                           resume=bool(resume_from)) if ctx.is_main else None
    bar = tqdm(range(actor.iteration, cfg.train_iters), desc="rl", disable=not (ctx.is_main and
                                                                               cfg.logging.progress_bar))
    skipped = 0
    for step in bar:
        t0 = time.perf_counter()
        batch_queries = stream.next_batch(cfg.rollout.rollout_batch_size)
        built = None
        if ctx.is_main:
            rollouts = generate_rollouts(engine, batch_queries, cfg.rollout, tokenizer, step, cfg.seed)  # (1)
            score_rollouts(rollouts, batch_queries, reward_fn)                                           # (2)
            built = builder.build(batch_queries, rollouts, step)                                         # (3)
            built.metrics.update(rollout_metrics(rollouts))
        t_rollout = time.perf_counter() - t0
        built = _broadcast(built, ctx)
        metrics = dict(built.metrics)
        if built.trajectories:
            batch = collate(built.trajectories, tokenizer.pad_id, cfg.tapo.train_constructed_prefix)       # (4)
            metrics.update(fill_policy_tensors(batch, actor, cfg.tapo))
            metrics.update(optimizer_step(actor, batch, cfg, skipped))                                  # (5)
            skipped = skipped + 1 if metrics["skipped_nonfinite"] else 0
        else:
            actor.iteration += 1  # nothing carried signal this step: no update, but the step is consumed
        metrics.update(push_weights(weight_sync, cfg, actor, engine, probes))                           # (6)
        metrics.update({"time/rollout": t_rollout, "time/step": time.perf_counter() - t0})
        if ctx.is_main:
            if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0:
                metrics.update(run_evals(engine, queries, reward_fn, tokenizer, cfg))
            logger.log(step + 1, metrics)
            bar.set_postfix(acc=f"{metrics.get('rollout/accuracy', 0):.2f}", loss=f"{metrics.get('loss', 0):.3f}")
        if cfg.checkpoint.save and cfg.checkpoint.save_interval and (step + 1) % cfg.checkpoint.save_interval == 0:
            actor.save_checkpoint(cfg.checkpoint.save, {"stream": stream.state()})
    final_ckpt = actor.save_checkpoint(cfg.checkpoint.save, {"stream": stream.state()}) if cfg.checkpoint.save else None
    if final_ckpt is not None and cfg.checkpoint.export_hf:
        export_hf(final_ckpt, cfg)  # the final checkpoint as an HF directory ready for serving
    weight_sync.disconnect()
    if logger:
        upload_curves(logger, cfg.logging.run_name)
        logger.close()
    return {"actor": actor, "engine": engine, "tokenizer": tokenizer, "queries": queries, "reward_fn": reward_fn,
            "ctx": ctx}
