"""Disaggregated weight sync: trainer source ranks broadcast buckets to engines in another pool.

One weight-update group per pipeline stage and engine server (``tapo-pp{stage}-e{i}``): group rank 0 is the
stage's source rank (TP 0, DP 0), ranks 1.. are that engine's GPUs, so a restarted engine rebuilds only its own
group. The transport drives the engine's receiving end (``RolloutEngine``:
``init_weights_update_group``, ``begin_weight_update``, ``update_weights_from_distributed``, ``end_weight_update``)
and never looks at the engine's type. Per sync (SGLang 0.5.23's rules, see ``rollout/sglang.py``):

    rank 0:   engines restarted since their groups were made: every source rank rebuilds those groups (collective)
    rank 0:   begin_weight_update: /pause_generation (abort) + /begin_weight_update on every server
    all:      iterate the stage export in lockstep (TP all-gathers); per bucket the source rank flattens it into
              ONE buffer (``flatten_for_broadcast``), announces it (/update_weights_from_distributed,
              ``load_format="flattened_bucket"``) and broadcasts it once per engine group (engines in parallel);
              the next bucket is exported while the engines answer (export of k+1 overlaps the receive of k)
    all:      all-reduce "did every source succeed" over the trainer world
    rank 0:   end_weight_update: /end_weight_update, and on success /update_weight_version + /flush_cache +
              /continue_generation; on failure the engine stays paused (SGLang holds a partial update)
    all:      success, or one WeightSyncError naming the engine and the version on every rank

Backend-agnostic: NCCL between GPU trainers and SGLang, gloo between a CPU trainer and the native engine server
(``rollout.remote``), which is how the CPU tests run this same code.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from tapo_megatron.convert.qwen3 import export_hf_weights
from tapo_megatron.parallel import ParallelContext, broadcast_object, free_port
from tapo_megatron.parallel.update_group import destroy_weight_update_group, init_weight_update_group
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.training.weight_sync.common import (
    SyncStats,
    Timer,
    WeightSync,
    WeightSyncError,
    bucket_nbytes,
    flatten_for_broadcast,
    is_source_rank,
)


class DistributedWeightSync(WeightSync):
    """Broadcast-based sync into engines in a separate pool (SGLang update-from-distributed).

    Args:
        model: the actor's (possibly DDP-wrapped) Qwen3 stage.
        ctx: the trainer's parallel context.
        engine: on every source rank an engine client of the same servers (rank 0: the rollout engine itself;
            other source ranks: ``SGLangEngine(servers)`` built from the URLs); None on the other ranks.
        bucket_bytes: bound on one announced bucket (a larger tensor goes alone).
        backend: "nccl" or "gloo" (default: the trainer's backend).
        master_address: an address of the source ranks' hosts reachable from the engines.
        group_timeout_s: how long a broadcast may wait for a peer before the group fails.
    """

    mode = "distributed"

    def __init__(self, model, ctx: ParallelContext, engine: RolloutEngine | None, bucket_bytes: int, *,
                 backend: str | None = None, master_address: str = "127.0.0.1", group_timeout_s: float = 300.0):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
        self.model, self.ctx, self.engine, self.bucket_bytes = model, ctx, engine, bucket_bytes
        self.backend = backend or ctx.backend
        self.master_address = master_address
        self.group_timeout_s = group_timeout_s
        self._groups: dict[int, dist.ProcessGroup] = {}  # engine server index -> its update group
        self._pool: ThreadPoolExecutor | None = None  # one thread per engine group
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsync-send")  # one bucket in flight
        self.rebuilds = 0

    def group_name(self, server: int) -> str:
        return f"tapo-pp{self.ctx.pp_rank}-e{server}"

    def connect(self, servers: list[int] | None = None) -> None:
        """Create this stage's update group with each engine server (one group per engine, so a restarted engine
        rebuilds only its own); collective over trainer ranks."""
        if is_source_rank(self.ctx):
            if self.engine is None:
                raise WeightSyncError(f"source rank {self.ctx.rank} has no engine client to reach the servers")
            count = len(self.engine.servers)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1 + count, thread_name_prefix="wsync")
            for i in range(count) if servers is None else servers:
                port = free_port(self.master_address)

                def join(world: int, i: int = i, port: int = port) -> None:
                    self._groups[i] = init_weight_update_group(
                        master_address=self.master_address, master_port=port, rank=0, world_size=world,
                        group_name=self.group_name(i), backend=self.backend, timeout_s=self.group_timeout_s)

                self.engine.init_weights_update_group(self.master_address, port, self.group_name(i), self.backend,
                                                      join, servers=[i])
        if self.ctx.world_size > 1:
            dist.barrier()

    def _rebuild_if_lost(self) -> None:
        """Engines that restarted lost their side of their update groups: rebuild those (collective)."""
        lost = self.engine.lost_groups() if self.ctx.rank == 0 and self.engine is not None else []
        if self.ctx.world_size > 1:
            lost = broadcast_object(lost, self.ctx)
        if not lost:
            return
        if is_source_rank(self.ctx):
            for i in lost:
                self.engine.destroy_weights_update_group(self.group_name(i), servers=[i])
                if i in self._groups:
                    destroy_weight_update_group(self._groups.pop(i))
        self.rebuilds += 1
        self._shapes_checked = False  # a restarted engine may have come back with another model
        self.connect(lost)

    def sync(self, version: int) -> SyncStats:
        stats = SyncStats(mode=self.mode, version=version)
        with Timer() as timer:
            self._rebuild_if_lost()
            self.check_engine_shapes(version)
            error = None
            if self.ctx.rank == 0:
                try:
                    self.engine.begin_weight_update(version)
                except Exception as err:  # noqa: BLE001 - reported through the all-reduce below
                    error = f"{type(err).__name__}: {err}"
            if self.ctx.world_size > 1:
                dist.barrier()
            error = self._send_stage(stats, version, skip=error is not None) or error
            ok = torch.tensor([0.0 if error else 1.0], device=self.ctx.device)
            if self.ctx.world_size > 1:
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            reason = error or "a bucket failed on another source rank"
            if self.ctx.rank == 0:
                try:
                    self.engine.end_weight_update(version, ok=ok.item() >= 1.0, reason=reason)
                except Exception as err:  # noqa: BLE001
                    if ok.item() >= 1.0:
                        ok.zero_()
                        reason = error = f"{type(err).__name__}: {err}"
            if self.ctx.world_size > 1:
                ok_all = torch.tensor([ok.item()], device=self.ctx.device)
                dist.all_reduce(ok_all, op=dist.ReduceOp.MIN)
                ok = ok_all
            if ok.item() < 1.0:
                served = self.engine.weight_version if self.engine is not None else "the previous version"
                raise WeightSyncError(f"distributed weight sync to version {version} failed"
                                      + (f" on rank {self.ctx.rank}: {error}" if error else " on another rank")
                                      + f"; the engines stay paused on version {served} until a sync completes")
        stats.seconds = timer.seconds
        return stats

    def _send_stage(self, stats: SyncStats, version: int, skip: bool) -> str | None:
        """Iterate this stage's export; the source sends each bucket as one broadcast, overlapping the export of
        the next bucket with the engines' receive. Returns the first error (the source then stops sending but keeps
        iterating, so its TP peers' all-gathers still match)."""
        source = is_source_rank(self.ctx)
        if source and not self._groups:
            return "not connected: call connect() first"
        error: str | None = None
        inflight: Future | None = None
        try:
            for bucket in export_hf_weights(self.model, self.ctx, self.bucket_bytes):
                if not source or skip or error is not None:
                    continue
                flat = flatten_for_broadcast(bucket)
                if inflight is not None:
                    error = _result(inflight)
                    inflight = None
                    if error is not None:
                        continue
                inflight = self._sender.submit(self._send_bucket, flat, version)
                stats.bucket_bytes.append(bucket_nbytes(bucket))
                stats.bytes += stats.bucket_bytes[-1]
                stats.num_tensors += len(bucket)
        except Exception as err:  # noqa: BLE001 - the export itself failed: report it through the all-reduce
            error = error or f"{type(err).__name__}: {err}"
        if inflight is not None:
            error = _result(inflight) or error
        return error

    def _send_bucket(self, flat, version: int) -> None:
        """The bucket to every engine over its own group, the engines in parallel; one error naming them all."""
        def one(i: int) -> None:
            group = self._groups[i]
            self.engine.update_weights_from_distributed(
                flat, self.group_name(i), version, servers=[i],
                send=lambda: dist.broadcast(flat.flat, src=0, group=group))

        futures = [self._pool.submit(one, i) for i in sorted(self._groups)]
        errors = [e for e in map(_result, futures) if e is not None]
        if errors:
            raise WeightSyncError("; ".join(errors))

    def disconnect(self) -> None:
        for i, group in sorted(self._groups.items()):
            self.engine.destroy_weights_update_group(self.group_name(i), servers=[i])
            destroy_weight_update_group(group)
        self._groups = {}
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self._sender.shutdown(wait=False)


def _result(future: Future) -> str | None:
    try:
        future.result()
        return None
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
