"""Engines from the ``rollout`` config section: the in-process native engine, or SGLang servers.

    engine = build_engine(cfg.rollout, shape, seed)   # on the rank that drives rollouts (rank 0)
"""
from __future__ import annotations

from tapo_megatron.config import ConfigError, RolloutConfig
from tapo_megatron.models.qwen3 import Qwen3Shape


def build_engine(rollout: RolloutConfig, shape: Qwen3Shape, seed: int):
    """The rollout engine: the native engine (random init of ``shape`` until the first weight sync), or SGLang
    servers (connected by URL or launched from ``rollout.engine_model_path``)."""
    if rollout.engine == "native":
        from tapo_megatron.rollout.native import NativeEngine

        return NativeEngine(shape.to_hf(), seed=seed, num_threads=rollout.num_threads)
    from tapo_megatron.rollout.sglang import ServerLaunch, SGLangEngine, sglang_server_argv

    timeouts = dict(startup_timeout_s=rollout.engine_startup_timeout_s,
                    request_timeout_s=rollout.engine_request_timeout_s)
    if rollout.engine_urls:
        return SGLangEngine.connect(rollout.engine_urls, **timeouts)
    if not rollout.engine_model_path:
        raise ConfigError("rollout.engine='sglang' needs rollout.engine_urls or rollout.engine_model_path")
    argv = sglang_server_argv(rollout.engine_model_path, random_seed=seed, extra=rollout.engine_server_args)
    return SGLangEngine.launch([ServerLaunch(argv=argv) for _ in range(rollout.num_engines)], **timeouts)
