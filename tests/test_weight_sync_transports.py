"""Weight-sync transports on CPU.

* Disaggregated (the acceptance test): a TP=2 trainer (torchrun, 2 gloo ranks) syncs into a native engine served in
  another process over gloo, through ``DistributedWeightSync`` and the SGLang HTTP protocol - the code path NCCL +
  SGLang uses. Afterwards the engine's log-probs equal the actor's within 1e-4 on fixed sequences; every bucket
  respects the size bound; a sync that fails half-way leaves the engine serving the previous version (its
  log-probs still those of version 1, not a mix), and the next sync succeeds. The same trainer then syncs through
  the disk transport (HF checkpoint + ``/update_weights_from_disk``), keeping only the newest checkpoint (a complete
  HF folder: every tensor name, config.json), and the engine then matches the actor within 1e-4 again.
* Per-dtype flattening round-trips byte-exactly.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tapo_megatron.rollout.sglang import SGLangEngine, ServerLaunch, native_server_argv
from tapo_megatron.training.weight_sync import flatten_by_dtype, unflatten

TESTS = Path(__file__).parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from _parallel_worker import SHAPE  # noqa: E402

from conftest import WORKER_ENV as ENV, Workers  # noqa: E402  (the one way workers are run)


def _launch_native_server(tmp_path: Path) -> SGLangEngine:
    model_dir = tmp_path / "engine_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(SHAPE.to_hf()))  # random init: only a sync can match
    return SGLangEngine.launch([ServerLaunch(argv=native_server_argv(str(model_dir), extra=["--seed", "99"]),
                                             env=ENV, log_dir=str(tmp_path))], startup_timeout_s=120)


def test_tp2_trainer_syncs_into_engine_process_over_gloo(tmp_path):
    engine = _launch_native_server(tmp_path)
    bucket_bytes = 32 * 1024  # above the largest tensor (24 KiB), well below the model (~0.2 MB): many buckets
    try:
        out = tmp_path / "out.pt"
        proc = Workers().run(TESTS / "_sync_trainer.py", engine.servers[0].url, bucket_bytes, out,
                             tmp_path / "disk", nproc=2, timeout=240, check=False)
        assert proc.returncode == 0, proc.stderr[-4000:] + "\n--- engine log ---\n" + engine.servers[0].log_tail()
        r = torch.load(out, weights_only=False)
    finally:
        engine.shutdown()

    # Bucketing: several buckets, each within the bound, together the whole model exactly once.
    sizes = r["v1_stats"]["bucket_bytes"]
    assert len(sizes) >= 5 and max(sizes) <= bucket_bytes
    assert sum(sizes) == r["v1_stats"]["bytes"] == r["expected_bytes"]
    # Parity after the sync: probes scored by prefill, and the engine's own sampling log-probs.
    assert r["v1_check"] <= 1e-4
    torch.testing.assert_close(r["v1_gen_engine_lp"], r["v1_gen_actor_lp"], atol=1e-4, rtol=0)
    assert r["v1_gen_versions"] == [1, 1, 1]
    # Interrupted sync: every rank raised, the engine still reports and computes version 1.
    assert r["interrupted_raised"] and "injected failure" in r["interrupted_message"]
    assert r["after_interrupt_version"] == 1
    torch.testing.assert_close(r["after_interrupt_engine_lp"], r["v1_actor_probe_lp"], atol=1e-4, rtol=0)
    # ... and that is a real difference: the trained actor (what a completed sync would give) differs.
    assert (r["v2_actor_probe_lp"] - r["v1_actor_probe_lp"]).abs().max() > 1e-2
    # The next sync completes and matches the updated actor.
    assert r["v3_check"] <= 1e-4 and r["v3_version"] == 3 and r["v3_engine_version"] == 3
    # Disk transport: the engine loaded version 5 from the newest folder; older folders were pruned.
    assert r["disk_check"] <= 1e-4 and r["disk_version"] == 5 and r["disk_bytes"] == r["expected_bytes"]
    assert r["disk_reload_path"] == str(tmp_path / "disk" / "v5")
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["v5"]
    from tapo_megatron.convert.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(tmp_path / "disk" / "v5")
    assert set(reader) == set(_hf_names()) and reader.config["num_hidden_layers"] == SHAPE.num_hidden_layers


def test_flatten_by_dtype_round_trips_bytes():
    g = torch.Generator().manual_seed(0)
    bucket = [("a", torch.randn(3, 4, generator=g)), ("b", torch.randn(5, generator=g).to(torch.bfloat16)),
              ("c", torch.randn(2, 2, 2, generator=g)), ("d", torch.randn(7, generator=g).to(torch.bfloat16))]
    flats = flatten_by_dtype(bucket)
    assert [f.dtype for f in flats] == [torch.float32, torch.bfloat16]
    assert [m.name for m in flats[0].metadata] == ["a", "c"] and flats[0].flat.numel() == (12 + 8) * 4
    assert flats[1].metadata[1].start_idx == 5 * 2 and flats[1].metadata[1].end_idx == 12 * 2
    back = dict(sum((unflatten(f) for f in flats), []))
    for name, tensor in bucket:
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)


def _hf_names():
    from tapo_megatron.convert.qwen3 import hf_shapes

    return hf_shapes(SHAPE)
