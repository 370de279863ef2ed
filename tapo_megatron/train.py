"""The RL loop (GRPO, or TAPO when ``tapo.enabled``): one screen of named calls, one stage each.

    rollout -> reward -> trajectory builder (DCS, construction, splicing, DAE) -> old log-probs + OTS weights
            -> actor step (PPO-clip, token-mean) -> weight sync to the engine -> log / eval / checkpoint

Run: ``tapo train --config recipe.yaml [section.field=value ...]`` (one process, or under torchrun for TP/PP/DP).

Where this implementation departs from the paper (TAPO_SPEC), and why:
- **One optimizer step per rollout batch** by default: the importance ratio is 1, so the old log-probs and OTS inputs
  are taken (detached) from the training forward itself, one forward per step; ``algorithm.ppo_epochs`` /
  ``mini_batch_size`` reuse the batch for several steps (a separate old-log-prob pass, the clip engages).
- **Each branch of the loss is a token mean over its own tokens** (``L_GRPO / N_orig + lambda * L_ref / N_cons``),
  so lambda = 0 is exactly GRPO; the paper does not say how the branches are normalised. ``tapo.branch_normalization
  =joint`` divides both by ``N_orig + lambda * N_cons`` instead (still exactly GRPO at lambda = 0), and
  ``tapo.branch_grad_interval`` logs both branches' gradient norms and their cosine.
- **Baselines** are algorithm choices of the same loop: ``algorithm.policy_loss=sft_constructed`` (SFT on the
  constructed trajectories) and ``algorithm.distillation=opsd`` (on-policy self-distillation, training/distill.py).
- **All-equal constructed groups** (DAE's open case) get ``tapo.constructed_zero_variance`` (default ``fixed``: +-1
  by correctness), and their share is logged; the paper leaves this open.
- **Original groups with one reward value are dropped** (``algorithm.drop_zero_variance_groups``): their advantage
  is 0; dropping changes only the token-mean normaliser.
- **The constructed trajectory's sampled prefix** is trained by default (the spec's reading); the demo recipe
  trains only from the divergence point on (``tapo.train_constructed_prefix=false``), which it measured to be stable.
- **The KL reference is the initial policy** (the weights the run started from), scored by the actor itself with
  swapped-in weights; off by default (``algorithm.kl_coef=0``), like the paper's GRPO baseline settings we follow.
- **Construction prompt and sampling** are ours (the paper's are not published): ``trajectory/templates/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from tapo_megatron.config import TrainConfig, to_dict
from tapo_megatron.convert.api import export_hf
from tapo_megatron.convert.checkpoints import has_checkpoint
from tapo_megatron.data.stream import QueryStream
from tapo_megatron.evaluation import evaluate_task
from tapo_megatron.logging.timing import Stopwatch
from tapo_megatron.logging.tracker import MetricsLogger, log_export, log_rollout_samples
from tapo_megatron.models.qwen3 import shape_from_config
from tapo_megatron.parallel import ParallelContext, broadcast_object, setup_parallel
from tapo_megatron.rewards import score_rollouts
from tapo_megatron.rollout.build import build_engine
from tapo_megatron.runguard import RunGuard
from tapo_megatron.rollout.sampling import rollout_metrics, rollout_sampling, sample_fresh_groups
from tapo_megatron.tasks import Task, build_task, fit_prompts
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.batch import collate
from tapo_megatron.training.distill import attach_teacher_prompts
from tapo_megatron.training.reference import ReferencePolicy
from tapo_megatron.training.step import policy_step
from tapo_megatron.training.weight_sync import (
    connect_weight_sync,
    probe_tokens,
    push_weights,
    refresh_engines,
    release_engine_memory,
    resume_engine_memory,
)
from tapo_megatron.trajectory.builder import TrajectoryBuilder
from tapo_megatron.trajectory.constructors import build_constructor

CURVE_KEYS = ["rollout/accuracy", "rollout/reward", "loss", "grad_norm", "rollout/response_length", "entropy",
              "approx_kl", "ots_weight_mean", "tapo/num_candidates"]


@dataclass
class TrainResult:
    """What a finished run hands back (the demo evaluates its engine; tests inspect the actor)."""

    actor: MegatronActor
    engine: object | None  # the rollout engine (rank 0), serving the final weights
    task: Task
    ctx: ParallelContext
    final_checkpoint: object | None = None  # Path of the last iter_<N>, when checkpoint.save is set
    last_metrics: dict = field(default_factory=dict)
    preempted: bool = False  # stopped early by SIGTERM/SIGUSR1/SIGINT after saving (runguard.PREEMPTED_EXIT_CODE)


def start_actor(cfg: TrainConfig, shape, ctx) -> tuple[MegatronActor, ReferencePolicy | None, dict | None]:
    """The actor with its starting weights, the KL reference (the weights the run started from, only when
    ``algorithm.kl_coef > 0``) and the resumed loop state: from ``checkpoint.load``, else from ``checkpoint.save``
    when a previous (killed) run left a checkpoint there; None for a fresh start."""
    actor = MegatronActor(shape, ctx, cfg.optimizer, cfg.parallel, cfg.model.params_dtype, cfg.model.kernel_backend,
                          cfg.model.logprobs_path, cfg.megatron)
    ck = cfg.checkpoint
    resume_from = ck.load or (ck.save if ck.save and has_checkpoint(ck.save) else "")
    if ck.pretrained_checkpoint and (not resume_from or cfg.algorithm.kl_coef > 0):
        actor.load_model_weights(ck.pretrained_checkpoint)
    reference = ReferencePolicy.snapshot(actor) if cfg.algorithm.kl_coef > 0 else None
    state = actor.load_checkpoint(resume_from) if resume_from else None
    if state is not None and ctx.is_main:
        print(f"[train] resumed from {resume_from} at step {actor.iteration}", flush=True)
    return actor, reference, state


def train(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    guard = RunGuard.start(cfg)  # directory lock, stale .tmp removed, SIGTERM/SIGUSR1/SIGINT -> save and stop
    shape = shape_from_config(cfg.model)
    ctx = setup_parallel(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                         cfg.seed, **shape.layout_dims())
    task = build_task(cfg.data, cfg.model, cfg.seed)
    task = fit_prompts(task, shape.max_position_embeddings - cfg.rollout.max_new_tokens)  # over-long ones dropped
    stream = QueryStream(task.train, cfg.seed)
    actor, reference, resumed = start_actor(cfg, shape, ctx)
    if resumed is not None:
        stream.load_state(resumed["stream"])
    engine = build_engine(cfg.rollout, shape, cfg.seed, launch=cfg.launch, num_gpus=ctx.world_size,
                          train_cfg=cfg) if ctx.is_main else None
    weight_sync = connect_weight_sync(cfg.rollout, actor, engine, engine_tp=cfg.launch.engine_tp)
    probes = probe_tokens(shape.vocab_size) if cfg.rollout.weight_sync_check == "logprobs" else None
    push_weights(weight_sync, cfg.rollout, actor, engine, probes)
    builder = None  # rollouts, construction and trajectory building happen on rank 0, next to the engine
    if ctx.is_main:
        constructor = build_constructor(cfg.tapo, engine=engine, tokenizer=task.tokenizer,
                                        step_verifier=task.step_verifier) if cfg.tapo.enabled else None
        builder = TrajectoryBuilder(cfg.tapo, cfg.algorithm, task.tokenizer, task.reward, constructor, seed=cfg.seed)
    logger = MetricsLogger(cfg.logging.output_dir, run_name=cfg.logging.run_name or "rl", config=to_dict(cfg),
                           wandb_mode=cfg.logging.wandb_mode, project=cfg.logging.wandb_project,
                           resume=resumed is not None, resume_step=actor.iteration if resumed is not None else None
                           ) if ctx.is_main else None
    bar = tqdm(range(actor.iteration, cfg.train_iters), desc="rl",
               disable=not (ctx.is_main and cfg.logging.progress_bar))
    skipped, metrics = 0, {}
    for step in bar:
        watch = Stopwatch()  # time/generate, reward, build, logprobs, train, sync (time/rollout: the first three)
        queries = stream.next_batch(cfg.rollout.rollout_batch_size)
        built, fresh = None, refresh_engines(weight_sync, actor, engine)  # a restarted engine gets the weights
        if ctx.is_main:
            params = rollout_sampling(cfg.rollout, task.tokenizer.eos_id, seed=cfg.seed * 100_003 + step)
            rollouts, fresh_metrics = sample_fresh_groups(engine, queries, cfg.rollout.n_samples_per_prompt, params,
                                                          task.tokenizer, actor.iteration,
                                                          cfg.rollout.max_weight_staleness,
                                                          cfg.rollout.max_resample_rounds)                   # (1)
            watch.lap("generate")
            score_rollouts(rollouts, queries, task.reward)                                                     # (2)
            watch.lap("reward")
            built = builder.build(queries, rollouts, step)                                                     # (3)
            built.metrics.update({**rollout_metrics(rollouts), **fresh_metrics, **fresh})
            watch.lap("build")
        t_rollout = watch.total()
        built = broadcast_object(built, ctx)
        metrics = dict(built.metrics)
        metrics.update(release_engine_memory(cfg.rollout, cfg.launch, engine))  # colocated: the GPUs to training
        if built.trajectories:
            batch = collate(built.trajectories, task.tokenizer.pad_id, cfg.tapo.train_constructed_prefix,    # (4)
                            cfg.parallel.max_tokens_per_micro_batch)
            attach_teacher_prompts(batch, built.trajectories, queries, task, cfg.algorithm)  # OPSD baseline only
            watch.lap()  # broadcast + collate: within time/step only; policy_step times log-probs and train itself
            step_metrics, skipped = policy_step(actor, batch, cfg.algorithm, cfg.tapo, reference, skipped)    # (5)
            metrics.update(step_metrics)
        else:
            actor.skip_step()  # nothing carried signal this step: no update, but the step is consumed
        watch.lap()
        metrics.update(resume_engine_memory(cfg.rollout, cfg.launch, engine))
        metrics.update(push_weights(weight_sync, cfg.rollout, actor, engine, probes))                         # (6)
        watch.lap("sync")
        metrics.update({**watch.times, "time/rollout": t_rollout, "time/step": watch.total()})
        if ctx.is_main:
            if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0:
                metrics.update(evaluate_task(engine, task, n_samples=cfg.data.eval_samples,
                                             max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed))
            logger.log(step + 1, metrics)
            log_rollout_samples(logger, cfg.logging, step + 1, built.trajectories, task.tokenizer)
            bar.set_postfix(acc=f"{metrics.get('rollout/accuracy', 0):.2f}", loss=f"{metrics.get('loss', 0):.3f}")
        if cfg.checkpoint.save and cfg.checkpoint.save_interval and (step + 1) % cfg.checkpoint.save_interval == 0:
            actor.save_checkpoint(cfg.checkpoint.save, {"stream": stream.state()}, cfg.checkpoint.keep_last)
        if guard.stop_requested(ctx):
            break
    final_ckpt = actor.save_checkpoint(cfg.checkpoint.save, {"stream": stream.state()},
                                       cfg.checkpoint.keep_last) if cfg.checkpoint.save else None
    # The final checkpoint as an HF directory for serving; a preempted run is not final.
    if final_ckpt is not None and cfg.checkpoint.export_hf and not guard.preempted:
        export_hf(final_ckpt, cfg.checkpoint.export_hf, cfg.checkpoint.export_tokenizer or cfg.model.tokenizer)
        log_export(logger, cfg.checkpoint.export_hf, cfg.logging.run_name)
    weight_sync.disconnect()
    if logger:
        logger.upload_curves(CURVE_KEYS, cfg.logging.run_name)
        logger.close()
    guard.close()
    return TrainResult(actor, engine, task, ctx, final_ckpt, metrics, preempted=guard.preempted)
