"""Colocated CUDA-IPC payloads are built per engine TP rank by the trainer rank on that rank's GPU (CPU check of the
construction and gather logic; the CUDA handles themselves need a GPU): with a TP=2 trainer and one TP-2 engine, or
two TP-1 engines, every bucket reaches the engines as one payload per dtype group whose entry for engine i's TP rank
r was serialized by the trainer rank on GPU i * engine_tp + r, all entries describe the same bytes, and the whole
model arrives once."""
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from conftest import Workers  # noqa: E402


def test_each_engine_rank_gets_the_payload_of_the_trainer_rank_on_its_gpu(tmp_path):
    out = tmp_path / "out.pt"
    Workers().run(TESTS / "_ipc_payload_worker.py", out, nproc=2, timeout=240)
    results = torch.load(out, weights_only=False)
    for engine_tp, servers in ((2, 1), (1, 2)):
        r = results[engine_tp]
        assert r["version"] == 3 and r["buckets"] >= 3 and r["bytes"] == results["expected_bytes"]
        assert r["received"] and all(len(per_server) == servers for per_server in r["received"])
        for per_server in r["received"]:
            # engine i's TP rank j: the payload of the trainer rank on GPU i * engine_tp + j
            built_by = [[p.split(":")[0] for p in ranks] for ranks in per_server]
            assert built_by == ([["rank0", "rank1"]] if engine_tp == 2 else [["rank0"], ["rank1"]])
            digests = {p.split(":", 1)[1] for ranks in per_server for p in ranks}
            assert len(digests) == 1  # same dtype and bytes: each rank's own copy of the same bucket
