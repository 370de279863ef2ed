"""One config system: nested dataclasses, YAML files, ``section.field=value`` command-line overrides.

Field names follow Megatron where Megatron has one (``tensor_model_parallel_size``, ``micro_batch_size``, ``lr``,
``min_lr``, ``lr_warmup_iters``, ``clip_grad``, ``adam_beta1``, ``save``, ``load``, ``save_interval``...).
Every stage gets only its own section. ``validate()`` names the bad field in its error.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tapo_megatron.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = ""  # checkpoint family, e.g. "Qwen3-8B": picks the entry of a parallelism preset (recipes/h100_*.yaml)
    hf_config: dict = field(default_factory=dict)  # HF Qwen3 config.json values (Qwen3Shape fields)
    hf_config_path: str = ""  # alternative: a config.json or an HF model dir
    tokenizer: str = ""  # "qwen3" (shipped), a local tokenizer dir, or empty: the task's own (arithmetic)
    params_dtype: str = "float32"  # float32 | bfloat16
    kernel_backend: str = "auto"  # log-prob/entropy/advantage kernels: auto (Triton on CUDA, torch on CPU) | triton | torch
    # logits: output layer then the log-prob kernel on [T, V/tp] logits; fused_linear: the LM-head GEMM fused into
    # the log-prob, chunked over tokens ([T, V] logits never exist)
    logprobs_path: str = "logits"


@dataclass
class DataConfig:
    task: str = "arithmetic"  # task registry name: "arithmetic" (embedded demo), "math" (JSONL sets), or "pkg.mod:fn"
    # math task: JSONL files with id, problem, answer, or shipped sets by name (deepscaler, math; aime24, aime25, hmmt25)
    train_file: str = ""
    train_files: list = field(default_factory=list)  # more training sets, appended after train_file (e.g. math)
    eval_files: list = field(default_factory=list)  # eval sets (aime24, aime25, hmmt25 or JSONL paths)
    reward: str = ""  # reward registry name ("exact", "math") or "pkg.module:function"; empty: the task's own
    on_bad_row: str = "skip"  # skip | raise
    num_train_problems: int = 20000  # arithmetic task: size of the training pool
    num_eval_problems: int = 500  # arithmetic task: held-out problems per evaluation
    eval_samples: int = 4  # n samples per problem at evaluation (plus one greedy)
    # Seed of the task's problems and splits (arithmetic: which problems are train / held-out); -1: the run's seed.
    # A paired-seed experiment fixes it, so every seed trains and is evaluated on the same problems.
    problem_seed: int = -1


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    micro_batch_size: int = 64  # sequences per forward/backward micro-batch (when no token budget is set)
    use_distributed_optimizer: bool = True
    # Token budget per micro-batch (rows x longest row <= budget; 0: micro_batch_size rows). A trajectory longer
    # than the budget is refused at collate time with its query id.
    max_tokens_per_micro_batch: int = 0
    packed_sequences: bool = True  # THD packing (cu_seqlens) when the Transformer Engine spec is in use (GPU)


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int = 0  # 0: constant after warmup; else cosine to min_lr at this iteration
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class RolloutConfig:
    engine: str = "native"  # native | sglang
    n_samples_per_prompt: int = 8  # K
    rollout_batch_size: int = 32  # queries per step (M)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    num_threads: int = 1  # native engine: torch threads for generation
    weight_sync_bucket_mb: float = 64.0
    # How weights reach the engines after each step (docs/rollout.md): colocated (in-process engine, or SGLang on
    # the training GPUs via CUDA IPC) | distributed (separate engine pool, NCCL broadcast) | disk (HF checkpoint).
    weight_sync_mode: str = "colocated"
    weight_sync_dir: str = ""  # disk mode: directory shared with the engines (one v<version>/ folder per sync)
    weight_sync_check: str = "none"  # none | logprobs: after each sync compare probe log-probs actor vs engines
    weight_sync_check_atol: float = 1e-3  # logprobs check tolerance (fp32 ~1e-5 is typical; bf16 needs ~5e-2)
    # SGLang engines: connect to running servers (URLs) or launch num_engines servers from engine_model_path.
    engine_urls: list = field(default_factory=list)
    num_engines: int = 1
    engine_model_path: str = ""  # HF folder the launched servers load at start
    engine_server_args: dict = field(default_factory=dict)  # extra SGLang server flags, e.g. {context-length: 4096}
    engine_startup_timeout_s: float = 600.0
    engine_request_timeout_s: float = 600.0
    engine_max_retries: int = 3  # retries of one generation shard after engine failures (each may restart it)
    weight_sync_master_address: str = "127.0.0.1"  # distributed: trainer source address reachable from engines
    # Train only on rollouts sampled with weights at most this many versions behind the trainer; older groups are
    # resampled (rollout/resampled_stale), and dropped after max_resample_rounds (rollout/dropped_stale).
    max_weight_staleness: int = 0
    max_resample_rounds: int = 2
    # SGLang honours per-prompt sampling seeds only with --enable-deterministic-inference (slower: batch-invariant
    # kernels). true: launched servers get the flag, connected servers without it are refused; false: SGLang
    # rollouts are sampled unseeded (not reproducible) and no seed is sent.
    deterministic_inference: bool = True


@dataclass
class AlgorithmConfig:
    # dae: originals and constructed trajectories normalised in separate groups (identical to GRPO without TAPO);
    # grpo: one group per query (with TAPO on, this is the paper's "no DAE" ablation)
    advantage_estimator: str = "dae"
    normalize_std: bool = True
    adv_eps: float = 1e-6
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    policy_loss: str = "ppo_clip"  # policy-loss registry name or "pkg.module:function" (algorithms.losses)
    # KL(pi || pi_ref) to the initial policy (the weights the run started from), per token; 0: no reference pass
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    drop_zero_variance_groups: bool = True  # originals whose group has one reward value carry no signal
    # Baseline OPSD (on-policy self-distillation): "opsd" replaces the reward advantages of the student's rollouts by
    # the per-token log-ratio log pi(y_t | teacher context) - log pi(y_t | x), the teacher being the same model
    # conditioned on the reference solution (training/distill.py). "none": reward advantages (GRPO / TAPO).
    distillation: str = "none"
    # PPO reuse of a rollout batch: ppo_epochs passes over it, each in mini-batches of mini_batch_size trajectories
    # (0: the whole batch). With 1 epoch of 1 mini-batch (the default) the step is on-policy: old log-probs and OTS
    # inputs come detached from the training forward, and no separate old-log-prob pass runs.
    ppo_epochs: int = 1
    mini_batch_size: int = 0
    # Truncated importance sampling for the engine/trainer log-prob mismatch (slime --use-tis): scale each sampled
    # token's policy-gradient term by min(exp(old - engine logprob), tis_cap); 0 = off.
    tis_cap: float = 0.0


@dataclass
class TapoConfig:
    enabled: bool = False
    constructor: str = "policy"  # policy | step_verifier
    n_pos: int = 2
    n_neg: int = 4
    m_max: int = 4
    constructed_coef: float = 1.0  # lambda
    # Train on the constructed trajectory's sampled prefix too (True: every response token, the spec's reading) or
    # only on the tokens from the divergence point on (False: the prefix is conditioning).
    train_constructed_prefix: bool = True
    ots_clip_min: float = 0.01
    ots_clip_max: float = 10.0
    constructed_zero_variance: str = "fixed"  # zero | pool | fixed (see algorithms.advantages)
    constructed_fixed_advantage: float = 1.0
    min_prefix_match: float = 0.9
    max_construction_tokens: int = 256
    construction_prompt: str = ""  # template file; empty: the packaged default
    construction_temperature: float = 1.0  # policy constructor sampling (open in the paper)
    construction_top_p: float = 1.0
    max_construction_chars: int = 65536  # longer constructor answers fail as "too_long"
    max_spliced_tokens: int = 512  # response-token cap of a spliced trajectory (eos included); longer: "too_long"
    # A splice reusing fewer of the wrong rollout's own tokens is a rewrite, not a micro-reflection (the paper's
    # worse "regenerate the whole solution" ablation): rejected as "short_prefix" and counted.
    min_reused_tokens: int = 1
    # How the constructed branch is normalised: per_branch (L_GRPO / N_orig + lambda L_ref / N_cons) or joint
    # ((sum_orig + lambda sum_cons) / (N_orig + lambda N_cons): one token mean in which a constructed token weighs
    # lambda; lambda = 0 is still exactly GRPO).
    branch_normalization: str = "per_branch"
    branch_grad_interval: int = 0  # every N steps log both branches' gradient norms and their cosine; 0: never


@dataclass
class SftConfig:
    global_batch_size: int = 64
    train_iters: int = 600
    data_file: str = ""  # JSONL of {"prompt": ..., "response": ...} (cold-start set); empty: the arithmetic task
    reflective_fraction: float = 0.0  # arithmetic task: share of examples with a corrected slip
    # Sort examples into global batches of similar length (less padding); batch order is still shuffled. This is
    # length bucketing, not packing: Megatron's local (non-TE) attention has no packed-sequence support, so packing
    # several examples into one row would let them attend to each other.
    length_bucketing: bool = False
    # SFT has its own optimizer schedule (the RL one lives in the top-level `optimizer` section).
    optimizer: "OptimizerConfig" = field(default_factory=lambda: OptimizerConfig(lr=2e-3, lr_warmup_iters=30,
                                                                                 lr_decay_iters=1200))


@dataclass
class ColdStartConfig:
    """``tapo coldstart build``: K rollouts per query (rollout section), offline ZPD filter, policy construction
    (tapo section: m_max, template, min_prefix_match, construction sampling), then three JSONL outputs."""

    query_files: list = field(default_factory=list)  # JSONL query files (DeepScaleR, MATH, or the user's own)
    model_path: str = ""  # HF dir or Megatron checkpoint that samples and constructs; empty: random init (tests)
    model_name: str = ""  # provenance; empty: model_path (or "random-init")
    model_version: str = ""  # provenance; empty: checkpoint iteration or a hash of the weight files
    output_dir: str = "runs/coldstart"
    max_queries: int = 0  # 0: every query of every file
    chunk_size: int = 64  # queries per resumable unit (outputs are committed chunk by chunk)
    zpd_low: float = 0.125  # offline ZPD filter: keep queries whose accuracy over K samples is in [low, high]
    zpd_high: float = 0.875
    num_reflection_examples: int = 30000  # construction-task + micro-reflective rows (paper: 30k)
    construction_task_fraction: float = 0.5  # share of the reflection rows that are construction-task examples
    num_instruction_examples: int = 15000  # tag-format + answer-format rows (paper: 15k)
    instruction_tag_fraction: float = 0.5  # share of the instruction rows that teach the tag format
    require_correct: bool = True  # keep only constructions whose spliced trajectory the verifier accepts
    instruction_template: str = ""  # tag-format prompt template; empty: the packaged default


@dataclass
class CheckpointConfig:
    save: str = ""  # directory; empty: no checkpoints
    load: str = ""  # directory to resume from; empty: fresh start (or `save` if it holds a checkpoint)
    save_interval: int = 0  # steps; 0: only at the end
    pretrained_checkpoint: str = ""  # weights-only start (e.g. the cold-start SFT checkpoint); fresh optimizer
    export_hf: str = ""  # directory: at the end of train(), the final checkpoint is exported here as an HF model
    export_tokenizer: str = ""  # tokenizer/generation-config folder copied into export_hf; empty: model.tokenizer
    keep_last: int = 0  # keep only the newest N iter_* checkpoints (older ones removed after each save); 0: keep all


@dataclass
class LoggingConfig:
    output_dir: str = "runs/default"
    wandb_project: str = "tapo-megatron"
    wandb_mode: str = "auto"  # auto (online if WANDB_API_KEY is set, else offline) | offline | online | disabled
    run_name: str = ""
    progress_bar: bool = True
    sample_table_interval: int = 10  # every N steps: a wandb table of rollout samples (0: never)
    sample_table_rows: int = 16  # rows in that table (constructed trajectories first)


@dataclass
class LaunchConfig:
    """How a run is placed on a cluster; read by ``tapo plan`` and ``launch/experiment.py``, not by the trainer.

    colocated: the rollout engines share the trainer's GPUs (one engine per ``engine_tp`` GPUs of the job);
    separate: the first ``engine_nodes`` nodes form the engine pool and the rest run the trainer ranks.
    """

    engine_placement: str = "colocated"  # colocated | separate
    engine_nodes: int = 0  # separate: nodes given to the engine pool
    engine_tp: int = 1  # GPUs per rollout engine (SGLang --tp)
    engine_port: int = 30000  # separate: first SGLang server port on each engine node
    engine_mem_fraction: float = 0.85  # separate: SGLang --mem-fraction-static (colocated: planned from what is left)
    max_prompt_tokens: int = 1024  # planner: longest prompt (tokens) for activation and KV-cache sizing
    gpu_memory_gb: float = 80.0  # planner: usable memory per GPU (H100 80GB)
    reserved_gb: float = 4.0  # planner: CUDA context, NCCL buffers, allocator fragmentation per GPU


@dataclass
class TrainConfig:
    seed: int = 1234
    train_iters: int = 100
    eval_interval: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    tapo: TapoConfig = field(default_factory=TapoConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    coldstart: ColdStartConfig = field(default_factory=ColdStartConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # Megatron-Core's own field names (TransformerConfig, OptimizerConfig, DistributedDataParallelConfig), passed
    # through to the actor: recompute_granularity, attention_backend, overlap_grad_reduce... (models/megatron_args.py)
    megatron: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        if self.rollout.n_samples_per_prompt < 2:
            raise ConfigError("rollout.n_samples_per_prompt must be >= 2 (group-normalised advantages need a group)")
        if self.rollout.engine not in ("native", "sglang"):
            raise ConfigError(f"rollout.engine={self.rollout.engine!r}: expected 'native' or 'sglang'")
        if self.rollout.weight_sync_mode not in ("colocated", "distributed", "disk"):
            raise ConfigError(f"rollout.weight_sync_mode={self.rollout.weight_sync_mode!r}: expected colocated, "
                              f"distributed or disk")
        if self.rollout.weight_sync_mode == "disk" and not self.rollout.weight_sync_dir:
            raise ConfigError("rollout.weight_sync_dir is required when rollout.weight_sync_mode is 'disk'")
        if self.rollout.weight_sync_mode == "distributed" and self.rollout.engine != "sglang":
            raise ConfigError("rollout.weight_sync_mode='distributed' needs rollout.engine='sglang' (engines in "
                              "their own processes)")
        if self.rollout.weight_sync_check not in ("none", "logprobs"):
            raise ConfigError(f"rollout.weight_sync_check={self.rollout.weight_sync_check!r}: expected none or "
                              f"logprobs")
        if self.rollout.engine == "sglang" and not self.rollout.engine_urls and not self.rollout.engine_model_path:
            raise ConfigError("rollout.engine='sglang' needs rollout.engine_urls (running servers) or "
                              "rollout.engine_model_path (servers to launch)")
        if self.rollout.max_weight_staleness < 0 or self.rollout.max_resample_rounds < 0:
            raise ConfigError("rollout.max_weight_staleness and rollout.max_resample_rounds must be >= 0")
        if self.algorithm.tis_cap < 0:
            raise ConfigError(f"algorithm.tis_cap={self.algorithm.tis_cap} must be >= 0 (0 = off)")
        if self.model.params_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.params_dtype={self.model.params_dtype!r}: expected 'float32' or 'bfloat16'")
        if self.model.kernel_backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"model.kernel_backend={self.model.kernel_backend!r}: expected auto, triton or torch")
        if not self.model.hf_config and not self.model.hf_config_path:
            raise ConfigError("model.hf_config or model.hf_config_path is required")
        if self.tapo.enabled and self.tapo.n_pos + self.tapo.n_neg > self.rollout.n_samples_per_prompt:
            raise ConfigError(
                f"tapo.n_pos + tapo.n_neg = {self.tapo.n_pos + self.tapo.n_neg} exceeds "
                f"rollout.n_samples_per_prompt = {self.rollout.n_samples_per_prompt}: no query can be a candidate")
        if self.algorithm.distillation not in ("none", "opsd"):
            raise ConfigError(f"algorithm.distillation={self.algorithm.distillation!r}: expected none or opsd")
        if self.algorithm.distillation == "opsd" and (self.tapo.enabled or self.algorithm.drop_zero_variance_groups):
            raise ConfigError("algorithm.distillation='opsd' is a baseline of its own: it needs tapo.enabled=false and "
                              "algorithm.drop_zero_variance_groups=false (every rollout carries a distillation signal)")
        if self.algorithm.policy_loss == "sft_constructed" and not self.tapo.enabled:
            raise ConfigError("algorithm.policy_loss='sft_constructed' trains on TAPO's constructed trajectories: it "
                              "needs tapo.enabled=true")
        if self.tapo.branch_normalization not in ("per_branch", "joint"):
            raise ConfigError(f"tapo.branch_normalization={self.tapo.branch_normalization!r}: expected per_branch "
                              "or joint")
        if self.tapo.branch_grad_interval < 0 or self.tapo.min_reused_tokens < 1:
            raise ConfigError("tapo.branch_grad_interval must be >= 0 and tapo.min_reused_tokens >= 1")
        if self.logging.wandb_mode not in ("auto", "offline", "online", "disabled"):
            raise ConfigError(f"logging.wandb_mode={self.logging.wandb_mode!r}: expected auto, offline, online or disabled")
        if self.logging.sample_table_interval < 0 or self.logging.sample_table_rows < 1:
            raise ConfigError("logging.sample_table_interval must be >= 0 and logging.sample_table_rows >= 1")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size"):
            if getattr(self.parallel, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1")
        if self.parallel.max_tokens_per_micro_batch < 0:
            raise ConfigError("parallel.max_tokens_per_micro_batch must be >= 0 (0: no token budget)")
        if self.model.logprobs_path not in ("logits", "fused_linear"):
            raise ConfigError(f"model.logprobs_path={self.model.logprobs_path!r}: expected logits or fused_linear")
        if self.algorithm.ppo_epochs < 1 or self.algorithm.mini_batch_size < 0:
            raise ConfigError("algorithm.ppo_epochs must be >= 1 and algorithm.mini_batch_size >= 0")
        if self.megatron:
            from tapo_megatron.models.megatron_args import split_megatron_args

            split_megatron_args(self.megatron)
        if self.checkpoint.export_hf and not self.checkpoint.save:
            raise ConfigError("checkpoint.export_hf needs checkpoint.save: the export is made from the final checkpoint")
        self._check_ranges()
        self._check_plugins()
        if self.launch.engine_placement not in ("colocated", "separate"):
            raise ConfigError(f"launch.engine_placement={self.launch.engine_placement!r}: expected colocated or separate")
        if self.launch.engine_placement == "separate" and self.launch.engine_nodes < 1:
            raise ConfigError("launch.engine_nodes must be >= 1 when launch.engine_placement is 'separate'")
        if self.launch.engine_tp < 1:
            raise ConfigError("launch.engine_tp must be >= 1")
        if not 0.0 < self.launch.engine_mem_fraction < 1.0:
            raise ConfigError(f"launch.engine_mem_fraction={self.launch.engine_mem_fraction}: expected in (0, 1)")
        return self

    # (field, lowest allowed value): counts and intervals refused before any model is built.
    _MIN_VALUES = (("train_iters", 1), ("eval_interval", 0), ("rollout.rollout_batch_size", 1),
                   ("rollout.max_new_tokens", 1), ("rollout.num_engines", 1), ("rollout.engine_max_retries", 0),
                   ("checkpoint.save_interval", 0), ("checkpoint.keep_last", 0), ("sft.global_batch_size", 1),
                   ("sft.train_iters", 1), ("optimizer.lr", 0), ("optimizer.clip_grad", 0),
                   ("optimizer.lr_warmup_iters", 0), ("optimizer.lr_decay_iters", 0), ("data.eval_samples", 0),
                   ("tapo.n_pos", 0), ("tapo.n_neg", 0), ("tapo.m_max", 0))

    def _check_ranges(self) -> None:
        for path, low in self._MIN_VALUES:
            section, _, name = path.rpartition(".")
            value = getattr(getattr(self, section) if section else self, name)
            if value < low:
                raise ConfigError(f"{path}={value} must be >= {low}")
        if not self.rollout.temperature > 0:
            raise ConfigError(f"rollout.temperature={self.rollout.temperature} must be > 0")
        if not 0 < self.rollout.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.rollout.top_p}: expected in (0, 1]")
        if self.checkpoint.keep_last and not self.checkpoint.save:
            raise ConfigError("checkpoint.keep_last needs checkpoint.save")

    def _check_plugins(self) -> None:
        """Every registry name resolves now, not after the model and engine are built (imports are local: the
        registries live in later stages, which import this module)."""
        import tapo_megatron.tasks  # noqa: F401  (registers the built-in tasks and their rewards)
        from tapo_megatron.algorithms.advantages import ADVANTAGES
        from tapo_megatron.algorithms.losses import KL_ESTIMATORS, POLICY_LOSSES
        from tapo_megatron.rewards import get_reward
        from tapo_megatron.tasks import TASKS
        from tapo_megatron.trajectory.constructors import CONSTRUCTORS

        lookups = [("data.task", TASKS.get, self.data.task),
                   ("algorithm.advantage_estimator", ADVANTAGES.get, self.algorithm.advantage_estimator),
                   ("algorithm.policy_loss", POLICY_LOSSES.get, self.algorithm.policy_loss)]
        if self.data.reward:
            lookups.append(("data.reward", get_reward, self.data.reward))
        if self.tapo.enabled:
            lookups.append(("tapo.constructor", CONSTRUCTORS.get, self.tapo.constructor))
        for field_name, get, value in lookups:
            try:
                get(value)
            except (KeyError, ImportError, AttributeError, TypeError, ValueError) as exc:
                raise ConfigError(f"{field_name}={value!r}: {str(exc).strip(chr(34) + chr(39))}") from None
        if self.algorithm.kl_coef < 0:
            raise ConfigError(f"algorithm.kl_coef={self.algorithm.kl_coef} must be >= 0")
        if self.algorithm.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"algorithm.kl_estimator={self.algorithm.kl_estimator!r}: expected one of "
                              f"{', '.join(KL_ESTIMATORS)}")


def _coerce(value, typ, where: str):
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected a boolean, got {value!r}")
        return bool(value)
    if typ in (int, float, str):
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    container = next((c for c in (list, dict) if typ is c or origin is c), None)
    if container is not None:
        if isinstance(value, str):  # from a command-line override: parse the YAML text
            value = yaml.safe_load(value)
        if not isinstance(value, container):
            raise ConfigError(f"{where}: expected a {'list' if container is list else 'mapping'}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build a (nested) config dataclass from a dict, refusing unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config field {path!r}; valid fields here: {', '.join(sorted(names))}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, path)
        else:
            kwargs[key] = _coerce(value, typ, path)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``a.b=value`` overrides (YAML-parsed values) in place; unknown paths are refused by name."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        path, raw = item.split("=", 1)
        target = cfg
        parts = path.split(".")
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise ConfigError(f"unknown config section {path!r}")
            target = getattr(target, part)
        name = parts[-1]
        if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"unknown config field {path!r}")
        typ = typing.get_type_hints(type(target))[name]
        value = yaml.safe_load(raw) if raw else raw
        setattr(target, name, _coerce(value, typ, path))
    return cfg


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(cfg):
    """Replace ``${VAR}`` in every string (and list-of-string) field with the environment's value, in place.

    Recipes name data and checkpoint locations through variables so one file serves a laptop, a container and a
    cluster: ``${TAPO_DATA}`` defaults to the shipped data folder (``data.assets.FILES_DIR``); other unset
    variables are left as written, so the error that follows names the path that still reads ``${VAR}``.
    """
    def sub(text: str) -> str:
        def one(m):
            name = m.group(1)
            if name in os.environ:
                return os.environ[name]
            if name == "TAPO_DATA":
                from tapo_megatron.data.assets import FILES_DIR

                return str(FILES_DIR)
            return m.group(0)
        return _ENV_REF.sub(one, text)

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            expand_env(value)
        elif isinstance(value, str) and "${" in value:
            setattr(cfg, f.name, sub(value))
        elif isinstance(value, list):
            setattr(cfg, f.name, [sub(v) if isinstance(v, str) else v for v in value])
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=TrainConfig):
    """Load a YAML recipe (or defaults), apply overrides, expand ``${VAR}`` references, validate."""
    data = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    cfg = from_dict(cls, data)
    apply_overrides(cfg, list(overrides))
    expand_env(cfg)
    return cfg.validate() if hasattr(cfg, "validate") else cfg
