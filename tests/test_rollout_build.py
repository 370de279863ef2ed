"""Colocated SGLang launch settings from the config and ``tapo plan`` (the argv itself is parsed by SGLang's own
parser in tests/_sync_sglang_contract.py)."""
import pytest

from tapo_megatron.config import ConfigError, LaunchConfig, RolloutConfig
from tapo_megatron.models.qwen3 import shape_from_config
from tapo_megatron.recipes import load_recipe
from tapo_megatron.rollout.build import colocated_mem_fraction, sglang_launches


def test_qwen3_8b_colocated_fraction_leaves_room_for_training():
    cfg = load_recipe("qwen3_8b_tapo", "h100_1x8")
    fraction = colocated_mem_fraction(cfg, shape_from_config(cfg.model), 8)
    # 8B bf16 weights on engine TP 1 are 16.4 GB of 80: the fraction holds them plus KV, and leaves the rest
    assert 16.4 / 80 < fraction < 0.9


def test_engine_tp_must_divide_the_gpus_and_pins_each_engine():
    rollout = RolloutConfig(engine="sglang", engine_model_path="/m")
    with pytest.raises(ConfigError, match="launch.engine_tp=3 does not divide the 8 training GPUs"):
        sglang_launches(rollout, 1, LaunchConfig(engine_tp=3), num_gpus=8)
    launches = sglang_launches(rollout, 1, LaunchConfig(engine_tp=4), num_gpus=8, mem_fraction=0.4)
    argv = [" ".join(spec.argv) for spec in launches]
    assert len(argv) == 2 and "--base-gpu-id 4" in argv[1] and "--tp-size 4" in argv[1]
    assert all("--enable-memory-saver" in a and "--mem-fraction-static 0.4" in a for a in argv)
    separate = sglang_launches(RolloutConfig(engine="sglang", engine_model_path="/m", num_engines=3,
                                             deterministic_inference=False),
                               1, LaunchConfig(engine_placement="separate", engine_nodes=1), num_gpus=8)
    assert len(separate) == 3 and not any("--enable-memory-saver" in " ".join(s.argv) for s in separate)
    assert not any("--enable-deterministic-inference" in " ".join(s.argv) for s in separate)


def test_connected_server_without_deterministic_inference_is_refused(tmp_path):
    import sys
    from pathlib import Path

    from tapo_megatron.rollout.sglang import EngineError, SGLangEngine, ServerLaunch

    fake = Path(__file__).parent / "_sync_fake_sglang.py"  # its /server_info has no enable_deterministic_inference
    launched = SGLangEngine.launch([ServerLaunch(argv=[sys.executable, str(fake), "--host", "{host}", "--port",
                                                       "{port}"], log_dir=str(tmp_path))], startup_timeout_s=60)
    try:
        url = launched.servers[0].url
        with pytest.raises(EngineError, match=r"engine 0 .* without --enable-deterministic-inference"):
            SGLangEngine.connect([url], require_deterministic=True, startup_timeout_s=10)
        assert SGLangEngine.connect([url], startup_timeout_s=10).servers[0].world_size == 1
    finally:
        launched.shutdown()

