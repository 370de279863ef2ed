"""Colocated CUDA-IPC payloads are built per engine TP rank by the trainer rank on that rank's GPU (CPU check of the
construction and gather logic; the CUDA handles themselves need a GPU): with a TP=2 trainer, every bucket reaches
the engine as one payload per dtype group whose entry for engine TP rank r was serialized by trainer rank r, the
two entries describe the same bytes, and the whole model arrives once."""
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from conftest import Workers  # noqa: E402


def test_each_engine_rank_gets_the_payload_of_the_trainer_rank_on_its_gpu(tmp_path):
    out = tmp_path / "out.pt"
    Workers().run(TESTS / "_ipc_payload_worker.py", out, nproc=2, timeout=240)
    r = torch.load(out, weights_only=False)
    assert r["version"] == 3 and r["buckets"] >= 3 and r["bytes"] == r["expected_bytes"]
    assert r["received"] and all(len(per_server) == 1 for per_server in r["received"])  # one engine (DP 1)
    for per_server in r["received"]:
        tp0, tp1 = per_server[0]
        assert tp0.startswith("rank0:") and tp1.startswith("rank1:")
        assert tp0.split(":", 1)[1] == tp1.split(":", 1)[1]  # same dtype, same bytes, each rank's own copy
