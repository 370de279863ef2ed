"""Engines from the ``rollout`` config section: the in-process native engine, or SGLang servers.

    engine = build_engine(cfg.rollout, shape, seed, launch=cfg.launch, num_gpus=world_size, train_cfg=cfg)  # rank 0

SGLang servers launched from ``rollout.engine_model_path``: with ``launch.engine_placement=colocated`` one server per
``launch.engine_tp`` of the job's ``num_gpus`` GPUs (server i on GPUs ``i*engine_tp ..``: ``--base-gpu-id``), each
with ``--enable-memory-saver`` (the loop releases its memory around the train step) and ``--mem-fraction-static``
from ``tapo plan`` (``colocated_mem_fraction``); separate placement launches ``rollout.num_engines`` servers with
``launch.engine_mem_fraction``. ``rollout.deterministic_inference`` adds ``--enable-deterministic-inference`` (or,
for connected servers, requires it), without which SGLang ignores the sampling seeds.
"""
from __future__ import annotations

from tapo_megatron.config import ConfigError, LaunchConfig, RolloutConfig
from tapo_megatron.models.qwen3 import Qwen3Shape


def colocated_mem_fraction(cfg, shape: Qwen3Shape, num_gpus: int) -> float:
    """SGLang ``--mem-fraction-static`` for engines on the training GPUs: the engine weights plus the KV cache
    ``tapo plan`` leaves after the trainer's resident state, as a share of GPU memory (one node of ``num_gpus``)."""
    from tapo_megatron.launch.plan import make_plan

    plan = make_plan(cfg, shape, 1, num_gpus)
    kv = min(plan.kv_cache_needed_gb, plan.kv_cache_available_gb)
    return round(min(0.95, max(0.05, (plan.engine_weights_gb + kv) / plan.gpu_memory_gb)), 3)


def build_engine(rollout: RolloutConfig, shape: Qwen3Shape, seed: int, *, launch: LaunchConfig | None = None,
                 num_gpus: int = 1, train_cfg=None):
    """The rollout engine: the native engine (random init of ``shape`` until the first weight sync), or SGLang
    servers (connected by URL or launched from ``rollout.engine_model_path``, see the module docstring)."""
    if rollout.engine == "native":
        from tapo_megatron.rollout.native import NativeEngine

        return NativeEngine(shape.to_hf(), seed=seed, num_threads=rollout.num_threads)
    from tapo_megatron.rollout.sglang import SGLangEngine

    opts = dict(startup_timeout_s=rollout.engine_startup_timeout_s, request_timeout_s=rollout.engine_request_timeout_s,
                max_retries=rollout.engine_max_retries, seeded=rollout.deterministic_inference)
    if rollout.engine_urls:
        return SGLangEngine.connect(rollout.engine_urls, require_deterministic=rollout.deterministic_inference, **opts)
    if not rollout.engine_model_path:
        raise ConfigError("rollout.engine='sglang' needs rollout.engine_urls or rollout.engine_model_path")
    colocated = (launch or LaunchConfig()).engine_placement == "colocated"
    fraction = colocated_mem_fraction(train_cfg, shape, num_gpus) if colocated and train_cfg is not None else None
    return SGLangEngine.launch(sglang_launches(rollout, seed, launch, num_gpus, fraction), **opts)


def sglang_launches(rollout: RolloutConfig, seed: int, launch: LaunchConfig | None = None, num_gpus: int = 1,
                    mem_fraction: float | None = None) -> list:
    """The ``ServerLaunch`` of every SGLang server to start (see the module docstring)."""
    from tapo_megatron.rollout.sglang import ServerLaunch, sglang_server_argv

    launch = launch or LaunchConfig()
    tp = launch.engine_tp
    colocated = launch.engine_placement == "colocated"
    if colocated and num_gpus % tp:
        raise ConfigError(f"launch.engine_tp={tp} does not divide the {num_gpus} training GPUs of a colocated run")
    count = num_gpus // tp if colocated else rollout.num_engines
    fraction = mem_fraction if colocated else launch.engine_mem_fraction
    return [ServerLaunch(argv=sglang_server_argv(
        rollout.engine_model_path, tp_size=tp, mem_fraction_static=fraction, enable_memory_saver=colocated,
        random_seed=seed, base_gpu_id=i * tp if colocated else None, deterministic=rollout.deterministic_inference,
        extra=rollout.engine_server_args), world_size=tp) for i in range(count)]
