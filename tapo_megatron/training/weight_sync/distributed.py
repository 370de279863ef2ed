"""Disaggregated weight sync: trainer source ranks broadcast buckets to engines in another pool.

One weight-update group per pipeline stage (``tapo-pp{stage}``): group rank 0 is the stage's source rank (TP 0,
DP 0), ranks 1.. are the engines' GPUs (engine i from ``rank_offset_i``). Per sync:

    rank 0:   POST /pause_generation to every engine (abort in-flight requests; start a fresh stage)
    all:      iterate the stage export in lockstep (TP all-gathers); per bucket the source rank
              POSTs /update_weights_from_distributed {names, dtypes, shapes, group_name} to every engine
              (in a thread: the engine's handler blocks in the broadcast) and broadcasts each tensor from rank 0
    all:      all-reduce "did every source succeed" over the trainer world
    rank 0:   success -> POST /update_weight_version {new_version} (the commit) and /continue_generation
              failure -> no commit; raise WeightSyncError on every rank

Backend-agnostic: NCCL between GPU trainers and SGLang, gloo between a CPU trainer and the native engine server
(``rollout.remote``), which is how the CPU tests run this same code. With SGLang, buckets are written into the live
model as they arrive, so a failed sync leaves a mix until the next successful one; pausing generation first means no
rollout is produced from it, and the version is not advanced. The native server stages and commits atomically.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
import torch.distributed as dist

from tapo_megatron.convert.qwen3 import export_hf_weights
from tapo_megatron.parallel import ParallelContext
from tapo_megatron.parallel import free_port
from tapo_megatron.parallel.update_group import destroy_weight_update_group, init_weight_update_group
from tapo_megatron.rollout.sglang import (
    EngineError,
    EngineServer,
    SGLangEngine,
    init_group_payload,
    pause_payload,
    update_distributed_payload,
    weight_version_payload,
)
from tapo_megatron.training.weight_sync.common import (
    SyncStats,
    Timer,
    WeightSync,
    WeightSyncError,
    bucket_nbytes,
    is_source_rank,
)


class DistributedWeightSync(WeightSync):
    """Broadcast-based sync into engines in a separate pool (SGLang update-from-distributed).

    Args:
        model: the actor's (possibly DDP-wrapped) Qwen3 stage.
        ctx: the trainer's parallel context.
        servers: every engine server, on every trainer rank (sources post to them; rank 0 also commits).
        bucket_bytes: bound on one announced bucket (a larger tensor goes alone).
        engine: the ``SGLangEngine`` on rank 0 (its version is updated after a commit); None elsewhere.
        backend: "nccl" or "gloo" (default: the trainer's backend).
        master_address: an address of the source ranks' hosts reachable from the engines.
        group_timeout_s: how long a broadcast may wait for a peer before the group fails.
    """

    mode = "distributed"

    def __init__(self, model, ctx: ParallelContext, servers: Sequence[EngineServer], bucket_bytes: int, *,
                 engine: SGLangEngine | None = None, backend: str | None = None,
                 master_address: str = "127.0.0.1", group_timeout_s: float = 300.0):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
        self.model, self.ctx, self.servers = model, ctx, list(servers)
        self.bucket_bytes, self.engine = bucket_bytes, engine
        self.backend = backend or ctx.backend
        self.master_address = master_address
        self.group_timeout_s = group_timeout_s
        self.group_name = f"tapo-pp{ctx.pp_rank}"
        self._group: dist.ProcessGroup | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(self.servers)), thread_name_prefix="wsync")

    def connect(self) -> None:
        """Create this stage's weight-update group with every engine (collective over trainer ranks)."""
        if is_source_rank(self.ctx):
            world = 1 + sum(s.world_size for s in self.servers)
            port = free_port(self.master_address)
            offsets = [1 + sum(s.world_size for s in self.servers[:i]) for i in range(len(self.servers))]
            futures = [self._pool.submit(s.post, "/init_weights_update_group",
                                         init_group_payload(self.master_address, port, off, world, self.group_name,
                                                            self.backend))
                       for s, off in zip(self.servers, offsets)]
            self._group = init_weight_update_group(
                master_address=self.master_address, master_port=port, rank=0, world_size=world,
                group_name=self.group_name, backend=self.backend, timeout_s=self.group_timeout_s)
            for f in futures:
                f.result()
        if self.ctx.world_size > 1:
            dist.barrier()

    def sync(self, version: int) -> SyncStats:
        stats = SyncStats(mode=self.mode, version=version)
        with Timer() as timer:
            if self.ctx.rank == 0:
                for server in self.servers:
                    server.post("/pause_generation", pause_payload())
            if self.ctx.world_size > 1:
                dist.barrier()
            error = self._send_stage(stats)
            ok = torch.tensor([0.0 if error else 1.0], device=self.ctx.device)
            if self.ctx.world_size > 1:
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if ok.item() < 1.0:
                raise WeightSyncError(f"weight sync to version {version} failed"
                                      + (f" on this rank: {error}" if error else " on another source rank")
                                      + f"; engines still serve version {self._served_version()}")
            if self.ctx.rank == 0:
                for server in self.servers:
                    server.post("/update_weight_version", weight_version_payload(version))
                    server.post("/continue_generation", {})
                if self.engine is not None:
                    self.engine.set_weight_version(version)
            if self.ctx.world_size > 1:
                dist.barrier()
        stats.seconds = timer.seconds
        return stats

    def _send_stage(self, stats: SyncStats) -> str | None:
        """Iterate this stage's export; the source announces and broadcasts every bucket. Returns the first error
        (after which the source stops sending but keeps iterating, so its TP peers' all-gathers still match)."""
        source = is_source_rank(self.ctx)
        if source and self._group is None:
            return "not connected: call connect() first"
        error: str | None = None
        try:
            for bucket in export_hf_weights(self.model, self.ctx, self.bucket_bytes):
                if not source or error is not None:
                    continue
                try:
                    self._send_bucket(bucket)
                except (EngineError, RuntimeError) as err:
                    error = f"{type(err).__name__}: {err}"
                    continue
                stats.bucket_bytes.append(bucket_nbytes(bucket))
                stats.bytes += stats.bucket_bytes[-1]
                stats.num_tensors += len(bucket)
        except Exception as err:  # noqa: BLE001 - the export itself failed: report it through the all-reduce
            error = error or f"{type(err).__name__}: {err}"
        return error

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        payload = update_distributed_payload(bucket, self.group_name)
        futures = [self._pool.submit(s.post, "/update_weights_from_distributed", payload) for s in self.servers]
        for _, tensor in bucket:
            dist.broadcast(tensor.detach().contiguous(), src=0, group=self._group)
        for f in futures:
            f.result()

    def _served_version(self) -> str:
        if self.engine is not None:
            return str(self.engine.weight_version)
        return "the previous one"

    def disconnect(self) -> None:
        if self._group is not None:
            for server in self.servers:
                try:
                    server.post("/destroy_weights_update_group", {"group_name": self.group_name})
                except EngineError:
                    pass  # a dead engine has no group left to destroy
            destroy_weight_update_group(self._group)
            self._group = None
        self._pool.shutdown(wait=False)
