"""Weight sync through the file system: write an HF checkpoint, ask the engines to load it.

Slowest transport, but needs nothing shared between trainer and engines except a directory (e.g. engines in another
cluster, or debugging). Rank 0 gathers every stage's buckets into ``<root>/v<version>/`` (safetensors shards +
``config.json``), then POSTs ``/update_weights_from_disk`` to every server (or, for an in-process engine, streams the
written files into ``update_weights``). The path becomes the engine's ``reload_path``, so a server restarted later
comes back on the current weights. Only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from tapo_megatron.convert.hf_io import HFCheckpointReader, HFShardWriter
from tapo_megatron.convert.qwen3 import shape_of_model
from tapo_megatron.parallel import ParallelContext
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.training.weight_sync.common import SyncStats, Timer, WeightSync, all_stage_buckets, bucket_nbytes


class DiskWeightSync(WeightSync):
    """Args: model, ctx; engine (rank 0; ``SGLangEngine`` or an in-process engine); root: checkpoint directory
    (shared with the engines); bucket_bytes; keep: how many versions to keep on disk."""

    mode = "disk"

    def __init__(self, model, ctx: ParallelContext, engine: RolloutEngine | None, root: str | Path,
                 bucket_bytes: int, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1 (the engines load the newest checkpoint)")
        self.model, self.ctx, self.engine = model, ctx, engine
        self.root, self.bucket_bytes, self.keep = Path(root), bucket_bytes, keep

    def sync(self, version: int) -> SyncStats:
        from tapo_megatron.rollout.sglang import SGLangEngine, update_disk_payload

        stats = SyncStats(mode=self.mode, version=version)
        with Timer() as timer:
            out = self.root / f"v{version}"
            writer = HFShardWriter(out, max_shard_bytes=max(self.bucket_bytes, 2**30)) if self.ctx.rank == 0 else None
            for bucket in all_stage_buckets(self.model, self.ctx, self.bucket_bytes):
                if writer is not None:
                    for name, tensor in bucket:
                        writer.add(name, tensor)
                    stats.bucket_bytes.append(bucket_nbytes(bucket))
                    stats.bytes += stats.bucket_bytes[-1]
                    stats.num_tensors += len(bucket)
            if writer is not None:
                writer.close()
                (out / "config.json").write_text(json.dumps(shape_of_model(self.model).to_hf(), indent=2) + "\n")
                if isinstance(self.engine, SGLangEngine):
                    for server in self.engine.servers:
                        server.post("/update_weights_from_disk", update_disk_payload(str(out), version))
                    self.engine.set_weight_version(version)
                    self.engine.reload_path = str(out)
                elif self.engine is not None:
                    reader = HFCheckpointReader(out)
                    try:
                        self.engine.update_weights(([(n, reader[n])] for n in reader), version)
                    finally:
                        reader.close()
                self._prune(version)
            if self.ctx.world_size > 1:
                dist.barrier()
        stats.seconds = timer.seconds
        return stats

    def _prune(self, version: int) -> None:
        """Delete all but the newest ``keep`` version folders (never the one just written)."""
        folders = sorted((p for p in self.root.glob("v*") if p.is_dir() and p.name[1:].isdigit()),
                         key=lambda p: int(p.name[1:]))
        for old in folders[:-self.keep]:
            if old.name != f"v{version}":
                shutil.rmtree(old, ignore_errors=True)
