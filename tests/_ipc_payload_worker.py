"""Worker for tests/test_ipc_payloads.py: a TP=2 trainer (torchrun, 2 gloo ranks) builds the colocated per-engine-rank
payloads with ``rank_payload_stream`` and a serializer that records which trainer rank built each payload and what
it holds; rank 0 feeds them to an engine stub that records what each engine TP rank would receive.

    torchrun --nproc_per_node 2 tests/_ipc_payload_worker.py OUT.pt   (engine TP 2, then engine TP 1)
"""
import sys

import torch
import torch.distributed as dist

from tapo_megatron.config import OptimizerConfig, ParallelConfig
from tapo_megatron.parallel import init_parallel
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.weight_sync import TensorWeightSync

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _parallel_worker import SHAPE, hf_weights  # noqa: E402


def serialize(flat) -> str:
    """Stands in for SGLang's IPC serializer: who built it, and a digest of the bytes it points at."""
    return f"rank{dist.get_rank()}:{flat.dtype}:{int(flat.flat.to(torch.int64).sum())}"


class RecordingEngine:
    weight_version = 0

    def __init__(self):
        self.received = []  # per payload: per server, per TP rank

    def expected_weight_shapes(self):
        return None

    def update_weights_from_tensor(self, stream, version):
        for payloads in stream:
            self.received += [p.per_server for p in payloads]
        self.weight_version = version


def main(out: str) -> None:
    torch.set_num_threads(1)
    ctx = init_parallel(2, 1, seed=7)
    actor = MegatronActor(SHAPE, ctx, OptimizerConfig(), ParallelConfig(micro_batch_size=2))
    actor.load_hf_state(hf_weights(SHAPE))
    results = {}
    for engine_tp in (2, 1):
        engine = RecordingEngine() if ctx.rank == 0 else None
        sync = TensorWeightSync(actor.module, ctx, engine, 16 * 1024, per_rank_ipc=True, serialize=serialize,
                                engine_tp=engine_tp)
        stats = sync.sync(3)
        if ctx.rank == 0:
            results[engine_tp] = {"received": engine.received, "version": engine.weight_version,
                                  "buckets": len(stats.bucket_bytes), "bytes": stats.bytes}
    if ctx.rank == 0:
        expected = hf_weights(SHAPE)
        results["expected_bytes"] = sum(t.numel() * t.element_size() for t in expected.values())
        torch.save(results, out)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
