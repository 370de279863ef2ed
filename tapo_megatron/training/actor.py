"""The policy actor: a Qwen3 ``GPTModel`` under Megatron DDP + DistributedOptimizer, any TP x PP x DP layout.

    actor = MegatronActor(shape, ctx, optim_cfg, parallel_cfg)
    logprobs, entropy = actor.compute_logprobs(tokens, lengths=lengths)   # [B, T] each, on every rank
    result = actor.train_step(tensors, loss_fn)                            # one optimizer step on the global batch
    actor.save_checkpoint(dir, state); actor.load_checkpoint(dir)

Every method takes the GLOBAL batch (identical on all ranks) and picks this rank's rows itself
(``training/microbatch.py``: rows balanced by length over DP ranks, micro-batches by ``micro_batch_size`` or the
``max_tokens_per_micro_batch`` budget, each trimmed to its longest row, packed as THD under Transformer Engine), so
a loss normalised by global token counts is exact under any DP size and micro-batching. Token-aligned tensors
follow records.py: entry t refers to token t; position 0 has no log-prob (0).
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from tapo_megatron.config import OptimizerConfig, ParallelConfig
from tapo_megatron.convert.checkpoints import (MANIFEST_FILE, STATE_FILE, checkpoint_files, error_summary,
                                               file_digest, fsync_path, iter_name, publish_checkpoint,
                                               resolve_checkpoint, verify_entries, write_manifest)
from tapo_megatron.errors import CheckpointError, TapoError
from tapo_megatron.models.megatron_args import merged, speed_defaults, split_megatron_args
from tapo_megatron.models.qwen3 import Qwen3Shape, build_qwen3, have_transformer_engine
from tapo_megatron.parallel import ParallelContext, any_rank, broadcast_object
from tapo_megatron.training.logprobs import LOGPROB_PATHS, token_logprobs
from tapo_megatron.training.microbatch import MicroBatchPlan, pack_rows, plan_micro_batches


# loss_fn(logprobs [mb, T], micro_batch: dict[str, Tensor]) -> (loss, metrics). The loss must already be
# normalised by GLOBAL token counts, so that the sum over micro-batches and data-parallel ranks is the batch loss.
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


class NonFiniteLossError(TapoError, RuntimeError):
    """The loss or gradient norm was NaN/inf; the step was not applied."""


class NonFiniteWeightsError(CheckpointError):
    """The weights hold NaN/inf: they are not saved (the gradient check keeps steps from producing them)."""


class _ErrorLog(logging.Handler):
    """Collects ERROR records of a logger while active (``with``): the first one is the real cause of a failure
    that the library reports to its caller only as a wrapped type name."""

    def __init__(self, name: str):
        super().__init__(logging.ERROR)
        self.logger, self.first = logging.getLogger(name), ""

    def emit(self, record: logging.LogRecord) -> None:
        self.first = self.first or record.getMessage()

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    metrics: dict
    logprobs: torch.Tensor | None = None  # [B, T] detached, from the training forward (``return_logprobs``)
    entropy: torch.Tensor | None = None


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad dim 1 with zeros to ``width`` (padding never reaches the loss: its mask is 0)."""
    return t if t.shape[1] >= width else torch.cat([t, t.new_zeros((t.shape[0], width - t.shape[1], *t.shape[2:]))], 1)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class MegatronActor:
    def __init__(self, shape: Qwen3Shape, ctx: ParallelContext, optim: OptimizerConfig,
                 parallel: ParallelConfig, params_dtype: str = "float32", kernel_backend: str = "auto",
                 logprobs_path: str = "logits", megatron: dict | None = None):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        self.shape, self.ctx, self.optim_cfg, self.parallel_cfg = shape, ctx, optim, parallel
        self.dtype = _dtype(params_dtype)
        self.kernel_backend = kernel_backend
        if logprobs_path not in LOGPROB_PATHS:
            raise ValueError(f"logprobs_path={logprobs_path!r}: expected one of {', '.join(LOGPROB_PATHS)}")
        self.logprobs_path = logprobs_path
        # THD packing needs Transformer Engine's attention (the local spec's attention refuses packed_seq_params)
        self.packed_sequences = parallel.packed_sequences and have_transformer_engine()
        # Megatron's own fields: our speed defaults (TE on GPU), then the validated ``megatron:`` section
        args = merged(speed_defaults(ctx.tp_size, have_transformer_engine()), split_megatron_args(megatron or {}))
        module = build_qwen3(shape, ctx, self.dtype, args["transformer"])
        self.config = module.config
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=parallel.use_distributed_optimizer,
                                                   **args["ddp"])
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=module)
        # Without this, DP gradients are silently never reduced (STACK_NOTES).
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.model.no_sync
        self.optimizer = get_megatron_optimizer(
            McoreOptimizerConfig(
                optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad, bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
                use_distributed_optimizer=parallel.use_distributed_optimizer, **args["optimizer"]),
            [self.model])
        self.iteration = 0
        self.preempted = False  # set by run_sft when a stop signal ended the run early
        self.verify_sha256 = True  # load: check checkpoint files against their manifest's sha256 (else sizes only)
        self._last_save: Path | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped GPTModel stage (sharded state dicts and weight export are taken from it)."""
        return self.model.module

    def lr_at(self, iteration: int) -> float:
        o = self.optim_cfg
        if o.lr_warmup_iters and iteration < o.lr_warmup_iters:
            return o.lr * (iteration + 1) / o.lr_warmup_iters
        if not o.lr_decay_iters:
            return o.lr
        progress = min(1.0, (iteration - o.lr_warmup_iters) / max(1, o.lr_decay_iters - o.lr_warmup_iters))
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))

    def _plan(self, tensors: dict[str, torch.Tensor]) -> tuple[MicroBatchPlan, list[dict]]:
        """The global plan (identical on every rank) and this DP rank's micro-batches, each trimmed to its longest
        row. ``tensors["lengths"]`` [B] (tokens per row, padding excluded) enables trimming; without it every row
        counts as full length."""
        tensors = dict(tensors)
        lengths = tensors.pop("lengths", None)
        batch_size, seq_len = tensors["tokens"].shape
        lengths = [seq_len] * batch_size if lengths is None else [int(n) for n in lengths]
        plan = plan_micro_batches(lengths, self.ctx.dp_size, self.parallel_cfg.micro_batch_size,
                                  self.parallel_cfg.max_tokens_per_micro_batch)
        # sequence parallelism splits the sequence over TP ranks: widths (unpacked) must divide by TP
        multiple = self.ctx.tp_size if self.config.sequence_parallel and not self.packed_sequences else 1
        micro_batches = []
        for mb in plan.ranks[self.ctx.dp_rank]:
            if mb.rows:
                idx, width = torch.tensor(mb.rows), -(-mb.seq_len // multiple) * multiple
                part = {k: _pad_to(v[idx, :width], width) for k, v in tensors.items() if v is not None}
            else:  # a rank without rows runs one all-padding row (loss mask 0) so the schedule and DDP still run
                part = {k: v.new_zeros((1, 1, *v.shape[2:])) for k, v in tensors.items() if v is not None}
            part["rows"], part["lengths"] = mb.rows, [lengths[i] for i in mb.rows] or [1]
            micro_batches.append(part)
        return plan, micro_batches

    def _forward_backward(self, micro_batches: list[dict], loss_fn: Callable, forward_only: bool,
                          temperature: float = 1.0, with_entropy: bool = False) -> list[dict]:
        from megatron.core.packed_seq_params import PackedSeqParams
        from megatron.core.pipeline_parallel import get_forward_backward_func

        num_mb = len(micro_batches)
        scale = num_mb * self.ctx.dp_size  # undo the schedule's 1/num_microbatches and DDP's 1/dp averaging
        fused = self.logprobs_path == "fused_linear"
        tp_multiple = self.ctx.tp_size if self.config.sequence_parallel else 1

        def output_processor(hidden_states, output_layer, output_weight, runtime_gather_output, context, **_):
            """Megatron's post-process hook: hand back the sequence-first [s, b, *] output (GPTModel's own path
            ends in a [b, s, V] transpose copy); the fused path keeps the hidden states and the output weight."""
            if not fused:
                return output_layer(hidden_states, weight=output_weight,
                                    runtime_gather_output=runtime_gather_output)[0]
            context["weight"] = output_weight if output_weight is not None else output_layer.weight
            if output_layer.sequence_parallel:  # the layer would all-gather its input; its backward reduce-scatters
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                hidden_states = gather_from_sequence_parallel_region(hidden_states, group=self.ctx.tp_group)
                context["grad_reduced"] = True
            return hidden_states

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            tokens = mb["tokens"].to(self.ctx.device)
            lengths, packed, context = mb["lengths"], None, {}
            if self.packed_sequences:
                tokens_in, position_ids, cu = pack_rows(tokens, lengths, multiple=tp_multiple)
                packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                         max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
            else:
                tokens_in = tokens
                position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
            output = model(tokens_in, position_ids, None, packed_seq_params=packed,
                           output_processor=output_processor, output_processor_context=context)

            def loss_func(output):
                logprobs, entropy = token_logprobs(
                    output, tokens_in if packed else tokens, lengths, self.ctx.tp_group, temperature=temperature,
                    with_entropy=with_entropy, backend=self.kernel_backend, output_weight=context.get("weight"),
                    reduce_grad_hidden=not context.get("grad_reduced", False), inplace_backward=not forward_only,
                    cu_seqlens=packed.cu_seqlens_q[:len(lengths) + 1] if packed else None, seq_len=tokens.shape[1])
                loss, metrics = loss_fn(logprobs, entropy, mb)
                return loss * scale, metrics

            return output, loss_func

        fb = get_forward_backward_func()
        return fb(forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.model],
                  num_microbatches=num_mb, seq_length=max(m["tokens"].shape[1] for m in micro_batches),
                  micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=forward_only)

    def _assemble(self, parts: list[tuple[list[int], torch.Tensor]], shape) -> torch.Tensor:
        """[B, T] on every rank from this rank's per-micro-batch [rows, len] pieces (last stage; rows disjoint
        across DP ranks, so a SUM over DP gathers them)."""
        full = torch.zeros(shape, dtype=torch.float32, device=self.ctx.device)
        for rows, values in parts if self.ctx.is_last_stage else ():
            if rows:  # a width rounded up for sequence parallelism may exceed T: only padding lies past it
                width = min(values.shape[1], shape[1])
                full[torch.tensor(rows, device=full.device), :width] = values[:, :width].float()
        full = self._broadcast_from_last_stage(full, shape, torch.float32)
        if self.ctx.dp_size > 1:
            dist.all_reduce(full, group=self.ctx.dp_group)
        return full.cpu()

    def _broadcast_from_last_stage(self, tensor: torch.Tensor | None, shape, dtype) -> torch.Tensor:
        if self.ctx.pp_size == 1:
            return tensor
        if tensor is None:
            tensor = torch.empty(shape, dtype=dtype, device=self.ctx.device)
        dist.broadcast(tensor, src=self.ctx.last_stage_global_rank, group=self.ctx.pp_group)
        return tensor

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def compute_logprobs(self, tokens: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                         lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs (and entropies) of ``tokens`` [B, T] under the current weights, on every rank.
        ``lengths`` [B] (tokens per row) trims padding; positions at or past a row's length give 0."""
        self.model.eval()
        _, micro_batches = self._plan({"tokens": tokens, "lengths": lengths})
        parts = {"logprobs": [], "entropy": []}

        def collect(logprobs, entropy, mb):
            parts["logprobs"].append((mb["rows"], logprobs))
            if entropy is not None:
                parts["entropy"].append((mb["rows"], entropy))
            return torch.zeros((), device=logprobs.device), {}

        self._forward_backward(micro_batches, collect, forward_only=True, temperature=temperature,
                               with_entropy=with_entropy)
        self.model.train()
        logprobs = self._assemble(parts["logprobs"], tokens.shape)
        return logprobs, (self._assemble(parts["entropy"], tokens.shape) if with_entropy else None)

    def train_step(self, tensors: dict[str, torch.Tensor], loss_fn: LossFn, with_entropy: bool = False,
                   return_logprobs: bool = False, advance: bool = True) -> StepResult:
        """One optimizer step on a global batch given as [B, ...] tensors (``tokens`` required, ``lengths`` [B]
        optional: trims each micro-batch to its longest row).

        ``loss_fn`` must normalise by global token counts (see LossFn); with ``with_entropy`` the micro-batch dict
        it gets carries ``entropy`` (detached) too. ``return_logprobs`` puts the training forward's detached [B, T]
        log-probs (and entropies) in ``StepResult.logprobs`` / ``.entropy``: the on-policy step needs no other
        forward. ``advance=False`` keeps the iteration (PPO mini-batches within one rollout step). Raises
        NonFiniteLossError (and leaves the weights untouched) when the loss or gradients are not finite.
        """
        self.model.train()
        plan, micro_batches = self._plan(tensors)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.lr_at(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        parts = {"logprobs": [], "entropy": []}

        def wrapped(logprobs, entropy, mb):
            if return_logprobs:
                parts["logprobs"].append((mb["rows"], logprobs.detach()))
            if entropy is not None:
                mb = {**mb, "entropy": entropy.detach()}
                if return_logprobs:
                    parts["entropy"].append((mb["rows"], mb["entropy"]))
            loss, metrics = loss_fn(logprobs, mb)
            return loss, {"loss": loss.detach().clone(), **{k: torch.as_tensor(v).detach().float()
                                                          for k, v in metrics.items()}}

        outputs = self._forward_backward(micro_batches, wrapped, forward_only=False, with_entropy=with_entropy)
        metrics = self._reduce_metrics(outputs)
        metrics["batch/pad_fraction"] = plan.pad_fraction
        shape = tensors["tokens"].shape
        logprobs = self._assemble(parts["logprobs"], shape) if return_logprobs else None
        entropy = self._assemble(parts["entropy"], shape) if return_logprobs and with_entropy else None
        if not math.isfinite(metrics.get("loss", 0.0)):
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            raise NonFiniteLossError(f"non-finite loss {metrics.get('loss')} at iteration {self.iteration}; "
                                     "the step was skipped and the weights are unchanged")
        if any_rank(not self._local_grads_finite(), self.ctx):  # before the update: Adam would write NaN weights
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            raise NonFiniteLossError(f"non-finite gradient at iteration {self.iteration} (finite loss); the step "
                                     "was skipped and the weights are unchanged")
        update_successful, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        if not update_successful or not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"non-finite gradient norm at iteration {self.iteration}; step skipped")
        if advance:
            self.iteration += 1
        return StepResult(loss=metrics.pop("loss"), grad_norm=grad_norm, lr=lr, metrics=metrics,
                          logprobs=logprobs, entropy=entropy)

    def _local_grads_finite(self) -> bool:
        return all(bool(torch.isfinite(b.grad_data).all())
                   for b in self.model.buffers + self.model.expert_parallel_buffers)

    def skip_step(self) -> None:
        """Consume an iteration without an update (nothing carried signal, or the step was non-finite), so the lr
        schedule, the weight version and resume stay aligned with the loop's step count."""
        self.iteration += 1

    def _reduce_metrics(self, outputs: list[dict]) -> dict:
        """Sum "loss" over micro-batches and DP ranks (it is globally normalised); average other metrics."""
        names = sorted(outputs[0]) if outputs else []
        values = torch.zeros(len(names) + 1, dtype=torch.float64)
        if self.ctx.is_last_stage and outputs:
            for i, name in enumerate(names):
                total = sum(float(o[name]) for o in outputs)
                values[i] = total if name == "loss" else total / len(outputs)
            values[-1] = 1.0
        # Only the last stage holds the outputs: sum over PP (others contribute 0) then over DP.
        if self.ctx.world_size > 1:
            if self.ctx.pp_size > 1:  # earlier stages do not know the metric names yet
                box = [names]
                dist.broadcast_object_list(box, src=self.ctx.last_stage_global_rank, group=self.ctx.pp_group)
                names = box[0]
            if len(values) != len(names) + 1:
                values = torch.zeros(len(names) + 1, dtype=torch.float64)
            dist.all_reduce(values, group=self.ctx.pp_group)
            dist.all_reduce(values, group=self.ctx.dp_group)
        result = {}
        for i, name in enumerate(names):
            result[name] = float(values[i]) if name == "loss" else float(values[i]) / self.ctx.dp_size
        return result

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, save_dir: str | Path, state: dict | None = None, keep_last: int = 0) -> Path:
        """Save model, optimizer, RNG and ``state`` (e.g. data position) as ``iter_<N>`` under save_dir.

        Follows ``convert.checkpoints``' rules: written to ``iter_<N>.tmp``, a manifest (size + sha256 per file)
        last, then renamed, then the ``latest`` pointer by atomic rename; ``keep_last`` > 0 removes older ones. A
        run killed mid-save resumes from the previous checkpoint. Saving the iteration this actor saved last is a
        no-op (the final save right after an interval save). Non-finite weights are refused, and a failed write
        (disk full) removes its ``.tmp`` and raises CheckpointError naming the path.
        """
        save_dir = Path(save_dir)
        final = save_dir / iter_name(self.iteration)
        if self._last_save == final and (final / MANIFEST_FILE).is_file():
            return final
        self._check_weights_finite(final)
        from torch.distributed.checkpoint.api import CheckpointException

        tmp = final.with_name(final.name + ".tmp")
        errors = _ErrorLog("megatron.core.dist_checkpointing")  # Megatron's writer logs the OS error, then wraps it
        try:
            with errors:
                self._write_checkpoint(tmp, state)
            digests = self._digest_files(tmp)
            if self.ctx.is_main:
                write_manifest(tmp, digests)
                publish_checkpoint(tmp, final, self.iteration, keep_last)
        except (OSError, RuntimeError, CheckpointException) as e:
            if self.ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"saving checkpoint {tmp} failed: {errors.first or error_summary(e)}; the partial "
                                  f"save was removed, the previous checkpoints in {save_dir} are untouched") from None
        dist.barrier()
        self._last_save = final
        return final

    def _write_checkpoint(self, tmp: Path, state: dict | None) -> None:
        from megatron.core import dist_checkpointing
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "model").mkdir(parents=True)
            (tmp / "optim").mkdir()
            (tmp / "rng").mkdir()
        dist.barrier()
        model_sd = self.module.sharded_state_dict()
        dist_checkpointing.save(model_sd, str(tmp / "model"))
        if not any(opt.optimizer.state for opt in self._inner_optimizers()):
            self._init_optimizer_state()  # no optimizer step yet: save the fresh (zero) Adam state Megatron expects
        optim_sd = self.optimizer.sharded_state_dict(self.module.sharded_state_dict(),
                                                     metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        dist_checkpointing.save(optim_sd, str(tmp / "optim"))
        torch.save({"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   tmp / "rng" / f"rank_{self.ctx.rank}.pt")
        dist.barrier()
        if self.ctx.is_main:
            (tmp / STATE_FILE).write_text(json.dumps({"iteration": self.iteration, "state": state or {},
                                                      "world_size": self.ctx.world_size}, indent=1))
            (tmp / "hf_config.json").write_text(json.dumps(self.shape.to_hf(), indent=1))
        dist.barrier()

    def _digest_files(self, ckpt: Path) -> dict[str, dict]:
        """Size + sha256 of every file of ``ckpt`` (each rank hashes and fsyncs its share), on rank 0."""
        files = checkpoint_files(ckpt) if self.ctx.is_main else None
        files = broadcast_object(files, self.ctx)
        mine = {}
        for rel in files[self.ctx.rank::self.ctx.world_size]:
            fsync_path(ckpt / rel)
            mine[rel] = file_digest(ckpt / rel)
        return {k: v for part in self._all_gather(mine) for k, v in part.items()}

    def _verify_entries(self, ckpt: Path, entries) -> list[str]:
        """``convert.checkpoints.Verifier`` split over the ranks; every rank gets every problem."""
        mine = verify_entries(ckpt, entries[self.ctx.rank::self.ctx.world_size], self.verify_sha256)
        return [p for part in self._all_gather(mine) for p in part]

    def _all_gather(self, obj) -> list:
        if self.ctx.world_size == 1:
            return [obj]
        parts = [None] * self.ctx.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def _check_weights_finite(self, where: Path) -> None:
        bad = [name for name, p in self.module.named_parameters() if not torch.isfinite(p).all()]
        if any_rank(bool(bad), self.ctx):
            raise NonFiniteWeightsError(f"refusing to save {where}: non-finite weights"
                                        + (f" in {bad[0]} ({len(bad)} tensors)" if bad else " on another rank"))

    def load_checkpoint(self, load_dir: str | Path, load_optimizer: bool = True) -> dict:
        """Load the newest intact checkpoint under ``load_dir`` (or ``load_dir`` itself if it is an ``iter_`` dir).

        Bad checkpoints (manifest mismatch, truncated files, unreadable state) are skipped with a message, the
        newest good one is used (``convert.checkpoints.resolve_checkpoint``). Works at any TP/PP/DP layout for the
        model; the optimizer is resharded too. Returns the saved ``state``. RNG is restored only when the world
        size matches (otherwise streams would not line up anyway).
        """
        from megatron.core import dist_checkpointing
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
        from torch.distributed.checkpoint.api import CheckpointException

        report = print if self.ctx.is_main else (lambda msg: None)
        ckpt = resolve_checkpoint(load_dir, self._verify_entries, report)
        meta = json.loads((ckpt / STATE_FILE).read_text())
        saved_shape = Qwen3Shape.from_file(ckpt / "hf_config.json")
        if saved_shape != self.shape:
            raise CheckpointError(f"checkpoint {ckpt} holds a model of shape {saved_shape}, but the actor was built "
                                  f"as {self.shape}")
        try:
            model_sd = self.module.sharded_state_dict()
            self.module.load_state_dict(dist_checkpointing.load(model_sd, str(ckpt / "model")))
            if load_optimizer and (ckpt / "optim").is_dir():
                self._init_optimizer_state()
                optim_sd = self.optimizer.sharded_state_dict(
                    self.module.sharded_state_dict(), is_loading=True,
                    metadata={"distrib_optim_sharding_type": "fully_reshardable"})
                _patch_torch_adam_reshardable_load()
                self.optimizer.load_state_dict(dist_checkpointing.load(optim_sd, str(ckpt / "optim")))
                self._unshare_adam_step()
        except (OSError, RuntimeError, EOFError, AssertionError, KeyError, ValueError, pickle.UnpicklingError,
                CheckpointException) as e:
            raise CheckpointError(f"checkpoint {ckpt} could not be loaded ({error_summary(e)}); "
                                  f"it has no manifest to check it by: pass checkpoint.load=<an older iter_* "
                                  f"directory> to resume from another") from e
        # DistributedOptimizer keeps fp32 main params; make the model params agree with them.
        self.iteration = meta["iteration"]
        rng_file = ckpt / "rng" / f"rank_{self.ctx.rank}.pt"
        if meta.get("world_size") == self.ctx.world_size and rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["cpu"])
            get_cuda_rng_tracker().set_states(rng["tracker"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        self._last_save = ckpt if load_optimizer else None
        return meta["state"]

    def load_model_weights(self, load_dir: str | Path) -> None:
        """Load only the model weights (e.g. the cold-start checkpoint at the start of RL); fresh optimizer."""
        self.load_checkpoint(load_dir, load_optimizer=False)
        self.iteration = 0
        self._reload_main_params()

    def load_hf_state(self, tensors) -> None:
        """Fill the model from HF-named full tensors (this rank slices its TP/PP part); fresh optimizer state."""
        from tapo_megatron.convert.qwen3 import load_hf_weights

        load_hf_weights(self.module, self.ctx, tensors)
        self._reload_main_params()

    def _inner_optimizers(self):
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    def _init_optimizer_state(self) -> None:
        # Torch Adam (no TE/apex) creates its state lazily; building the sharded state dict to load into needs it,
        # "step" included (STACK_NOTES). The saved step itself comes back through the param groups.
        for opt in self._inner_optimizers():
            inner = opt.optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(p.data)
                        state["exp_avg_sq"] = torch.zeros_like(p.data)
                    state.setdefault("step", torch.tensor(0.0))

    def _unshare_adam_step(self) -> None:
        # Megatron restores torch Adam's "step" as ONE tensor object shared by every param; torch Adam increments
        # it in place per param, so it would advance by the number of params each step. Give each its own copy.
        for opt in self._inner_optimizers():
            for state in opt.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].detach().clone()

    def _reload_main_params(self) -> None:
        """After loading weights into the model params, refresh the optimizer's fp32 main copies from them."""
        for opt in self._inner_optimizers():
            if hasattr(opt, "reload_model_params"):
                opt.reload_model_params()


_PATCHED = False


def _patch_torch_adam_reshardable_load() -> None:
    """Megatron-Core 0.19 bug with torch Adam (no TE/apex): loading a ``fully_reshardable`` DistributedOptimizer
    checkpoint copies every tensor in the live Adam state from the loaded tensors, but the loaded tensors never hold
    torch Adam's per-param ``step`` (Megatron restores it from the param groups) -> ``KeyError: 'step'``.
    Copy only the states that were loaded."""
    global _PATCHED
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if _PATCHED:
        return
    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_loaded_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **{k: v for k, v in self.optimizer.state[main_param].items()
                                       if isinstance(v, torch.Tensor) and k != "step"}}
        for key, target in dst.items():
            if isinstance(tensors.get(key), torch.Tensor):
                target.copy_(tensors[key])

    DistributedOptimizer._set_main_param_and_optimizer_states = set_loaded_states
    _PATCHED = True
