"""Weight sync through the file system: write an HF checkpoint, ask the engines to load it.

Slowest transport, but needs nothing shared between trainer and engines except a directory (e.g. engines in another
cluster, or debugging). Rank 0 gathers every stage's buckets into ``<root>/v<version>/`` (safetensors shards +
``config.json``), then calls ``engine.update_weights_from_disk(path, version)`` (SGLang: ``/update_weights_from_disk``
on every server, which becomes its ``reload_path``, so a server restarted later comes back on the current weights;
an in-process engine streams the written files into its atomic update). Only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


from tapo_megatron.convert.hf_io import HFShardWriter
from tapo_megatron.convert.qwen3 import shape_of_model
from tapo_megatron.parallel import ParallelContext
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.training.weight_sync.common import (
    SyncStats,
    Timer,
    WeightSync,
    all_stage_buckets,
    bucket_nbytes,
    raise_if_rank0_failed,
)


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
        stats = SyncStats(mode=self.mode, version=version)
        with Timer() as timer:
            self.check_engine_shapes(version)
            out = self.root / f"v{version}"
            writer = HFShardWriter(out, max_shard_bytes=max(self.bucket_bytes, 2**30)) if self.ctx.rank == 0 else None
            for bucket in all_stage_buckets(self.model, self.ctx, self.bucket_bytes):
                if writer is not None:
                    for name, tensor in bucket:
                        writer.add(name, tensor)
                    stats.bucket_bytes.append(bucket_nbytes(bucket))
                    stats.bytes += stats.bucket_bytes[-1]
                    stats.num_tensors += len(bucket)
            error = None
            if writer is not None:
                writer.close()
                (out / "config.json").write_text(json.dumps(shape_of_model(self.model).to_hf(), indent=2) + "\n")
                if self.engine is not None:
                    try:
                        self.engine.update_weights_from_disk(str(out), version)
                    except Exception as err:  # noqa: BLE001 - reported on every rank below
                        error = f"{type(err).__name__}: {err}"
                if error is None:
                    self._prune(version)
            raise_if_rank0_failed(self.ctx, self.mode, error, version, self.engine)
        stats.seconds = timer.seconds
        return stats

    def _prune(self, version: int) -> None:
        """Delete all but the newest ``keep`` version folders (never the one just written)."""
        folders = sorted((p for p in self.root.glob("v*") if p.is_dir() and p.name[1:].isdigit()),
                         key=lambda p: int(p.name[1:]))
        for old in folders[:-self.keep]:
            if old.name != f"v{version}":
                shutil.rmtree(old, ignore_errors=True)
