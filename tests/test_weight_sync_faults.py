"""Weight-sync faults, each injected: one clear WeightSyncError naming the engine and the weight version, and no
engine serving a half-updated model afterwards.

* An unreachable engine URL.
* A model whose shapes differ from the engine's: refused before any bucket is sent.
* One of two engines killed in the middle of a distributed sync (one update group per engine): the sync fails
  naming version and engine, the engine refuses to generate; after the restart the next sync sees the lost group,
  rebuilds only that one and pushes the current weights (both servers then score like the actor within 1e-4 and
  report the new version).
(An engine that answers an error mid-sync runs against SGLang's own manager in tests/_sync_sglang_contract.py.)
"""
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from tapo_megatron.config import OptimizerConfig, ParallelConfig
from tapo_megatron.parallel import free_port, init_parallel
from tapo_megatron.records import SamplingParams
from tapo_megatron.rollout.native import NativeEngine
from tapo_megatron.rollout.sglang import EngineError, EngineServer, SGLangEngine, ServerLaunch, native_server_argv
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.weight_sync import TensorWeightSync, WeightSyncError, check_logprobs, probe_tokens
from tapo_megatron.training.weight_sync import distributed as distributed_module

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from _parallel_worker import SHAPE  # noqa: E402

from conftest import WORKER_ENV as ENV  # noqa: E402


@pytest.fixture(scope="module")
def actor():
    torch.manual_seed(0)
    ctx = init_parallel(1, 1, seed=3)
    return MegatronActor(SHAPE, ctx, OptimizerConfig(lr=1e-2), ParallelConfig(micro_batch_size=2))


def test_unreachable_engine_is_named_with_the_version(actor):
    url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    engine = SGLangEngine([EngineServer(url=url, request_timeout_s=5)])
    with pytest.raises(WeightSyncError, match=rf"version 4 .*engine 0 \({url}\)"):
        TensorWeightSync(actor.module, actor.ctx, engine, 1 << 16).sync(4)


def test_shape_mismatch_is_refused_before_any_bucket(actor):
    other = {**SHAPE.to_hf(), "intermediate_size": SHAPE.intermediate_size * 2}
    engine = NativeEngine(other, seed=1)
    sent = []
    engine.update_weights = lambda buckets, version: sent.append(version)
    with pytest.raises(WeightSyncError, match=r"version 5 refused before sending anything.*mlp.gate_proj.weight"):
        TensorWeightSync(actor.module, actor.ctx, engine, 1 << 16).sync(5)
    assert sent == [] and engine.weight_version == 0


def test_engine_killed_mid_sync_then_restarted_gets_its_group_rebuilt(actor, tmp_path, monkeypatch):
    model_dir = tmp_path / "engine_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(SHAPE.to_hf()))
    launch = ServerLaunch(argv=native_server_argv(str(model_dir), extra=["--seed", "99"]), env=ENV,
                          log_dir=str(tmp_path))
    engine = SGLangEngine.launch([launch, launch], startup_timeout_s=120, request_timeout_s=30)
    sync = distributed_module.DistributedWeightSync(actor.module, actor.ctx, engine, 16 * 1024, group_timeout_s=15)
    probes = probe_tokens(SHAPE.vocab_size)
    try:
        sync.connect()
        sync.sync(1)
        assert check_logprobs(actor, engine, probes, atol=1e-4) <= 1e-4
        group0 = sync._groups[0]
        real_export = distributed_module.export_hf_weights

        def killing_export(model, ctx, nbytes):
            for i, bucket in enumerate(real_export(model, ctx, nbytes)):
                if i == 2:
                    os.killpg(engine.servers[1].process.pid, signal.SIGKILL)
                    engine.servers[1].process.wait()
                yield bucket

        monkeypatch.setattr(distributed_module, "export_hf_weights", killing_export)
        with pytest.raises(WeightSyncError, match=r"version 2 failed.*engine 1 \(http"):
            sync.sync(2)
        monkeypatch.setattr(distributed_module, "export_hf_weights", real_export)
        with pytest.raises(EngineError, match="partial weight update to version 2"):
            engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=2))
        engine.servers[1].restart()  # comes back with its launch weights and no update group
        assert engine.lost_groups() == [1] and engine.stale_servers() == [0, 1]  # all paused mid-update
        sync.sync(3)
        assert sync.rebuilds == 1 and sync._groups[0] is group0  # only the restarted engine's group was rebuilt
        assert engine.weight_version == 3 and [s.weight_version() for s in engine.servers] == [3, 3]
        assert check_logprobs(actor, engine, probes, atol=1e-4) <= 1e-4
        gens = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0, max_new_tokens=2))
        assert [g.weight_version for g in gens] == [3, 3]
    finally:
        sync.disconnect()
        engine.shutdown()
