"""Memory and layout planner: per-GPU memory of a recipe on N nodes x G GPUs, refusing layouts that cannot work.

``tapo plan --recipe qwen3_8b_tapo --nodes 1 --gpus-per-node 8`` prints, per GPU, the bytes of

- parameters, gradients and optimizer states of the largest pipeline stage, split over TP (the Megatron
  DistributedOptimizer also shards the fp32 main weights and Adam moments over DP);
- activations of the 1F1B schedule (the first stage holds PP micro-batches in flight) and the last stage's logits;
- the rollout engine: its bf16 weights and the KV cache the step's rollouts need all at once;

for the two engine placements (``launch.engine_placement``): ``colocated`` (engines on the trainer's GPUs; SGLang
releases its weights and KV cache while the trainer runs, the trainer's weights, grads and optimizer stay resident)
and ``separate`` (the first ``launch.engine_nodes`` nodes form the engine pool).

Estimates assume the GPU container's Transformer Engine layer spec (flash/fused attention: no S x S score matrix) and
what ``training/actor.py`` builds there: ``models.megatron_args.speed_defaults`` (sequence parallelism with TP > 1,
grads reduced in the param dtype) under the recipe's ``megatron:`` section (``recompute_granularity`` full or
selective with ``recompute_modules``, ``sequence_parallel``, ``grad_reduce_in_fp32``); micro-batches of
``parallel.max_tokens_per_micro_batch`` packed tokens when set (THD packing: no padding), else
``micro_batch_size`` rows of the longest sequence; logits with their in-place gradient (``model.logprobs_path=
logits``) or one tile (``fused_linear``). Sizes are in GB = 1e9 bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from tapo_megatron.errors import ConfigError

from tapo_megatron.config import TrainConfig
from tapo_megatron.models.megatron_args import merged, speed_defaults, split_megatron_args
from tapo_megatron.models.qwen3 import Qwen3Shape, check_parallel
from tapo_megatron.parallel import ParallelConfigError

GB = 1e9


class PlanError(ConfigError):
    """A layout that does not divide or does not fit; the message names the reason."""


@dataclass(frozen=True)
class Layout:
    """Where the trainer ranks and the rollout engines go."""

    nodes: int
    gpus_per_node: int
    placement: str  # colocated | separate
    trainer_gpus: int
    engine_gpus: int
    tp: int
    pp: int
    dp: int
    engine_tp: int
    num_engines: int


@dataclass
class MemoryPlan:
    """Per-GPU memory (GB) of one layout. ``trainer_peak_gb``: a trainer GPU at its peak (colocated: including the
    engine during rollout); ``engine_peak_gb``: an engine-pool GPU (separate placement only, else 0)."""

    layout: Layout
    num_parameters: int
    params_per_gpu: int  # parameters held by one trainer GPU (largest PP stage / TP)
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    logits_gb: float
    engine_weights_gb: float
    kv_cache_needed_gb: float  # KV cache for all of one engine's rollouts of a step at once
    kv_cache_available_gb: float
    reserved_gb: float
    trainer_peak_gb: float
    engine_peak_gb: float
    gpu_memory_gb: float
    seq_len: int
    sequences_per_engine: int
    notes: list[str] = field(default_factory=list)

    @property
    def static_gb(self) -> float:
        return self.params_gb + self.grads_gb + self.optimizer_gb

    def table(self) -> str:
        """The human-readable report ``tapo plan`` prints."""
        lo = self.layout
        rows = [
            f"layout: {lo.nodes} node(s) x {lo.gpus_per_node} GPU(s), engines {lo.placement}",
            f"  trainer: {lo.trainer_gpus} GPUs = TP {lo.tp} x PP {lo.pp} x DP {lo.dp}",
            f"  engines: {lo.num_engines} x TP {lo.engine_tp} on "
            f"{'the trainer GPUs' if lo.placement == 'colocated' else f'{lo.engine_gpus} pool GPUs'}",
            f"model: {self.num_parameters:,} parameters ({self.num_parameters / 1e9:.2f} B); "
            f"{self.params_per_gpu:,} per trainer GPU",
            f"sequence: {self.seq_len} tokens (prompt + response); {self.sequences_per_engine} rollouts per engine",
            "per-GPU memory (GB)",
            f"  parameters          {self.params_gb:8.2f}",
            f"  gradients           {self.grads_gb:8.2f}",
            f"  optimizer states    {self.optimizer_gb:8.2f}",
            f"  activations         {self.activations_gb:8.2f}",
            f"  logits              {self.logits_gb:8.2f}",
            f"  engine weights      {self.engine_weights_gb:8.2f}",
            f"  engine KV cache     {self.kv_cache_needed_gb:8.2f}  (needed; {self.kv_cache_available_gb:.2f} available)",
            f"  reserved            {self.reserved_gb:8.2f}",
            f"  trainer GPU peak    {self.trainer_peak_gb:8.2f} / {self.gpu_memory_gb:.0f}",
        ]
        if lo.placement == "separate":
            rows.append(f"  engine GPU peak     {self.engine_peak_gb:8.2f} / {self.gpu_memory_gb:.0f}")
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def stage_parameters(shape: Qwen3Shape, tp: int, pp: int) -> int:
    """Parameters on one GPU of the largest pipeline stage (first or last) at tensor-parallel size ``tp``.

    TP splits the attention/MLP matrices and the (vocab-parallel) embedding and output layer; RMSNorm weights are
    replicated. With tied embeddings and PP > 1, Megatron keeps a copy of the embedding on the last stage.
    """
    h, d, i, v = shape.hidden_size, shape.head_dim, shape.intermediate_size, shape.vocab_size
    q, kv = shape.num_attention_heads * d, shape.num_key_value_heads * d
    sharded_per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    replicated_per_layer = 2 * d + 2 * h  # q/k norms, input and pre-MLP norms
    layers = shape.num_hidden_layers // pp
    body = layers * (sharded_per_layer // tp + replicated_per_layer)
    embedding = v * h // tp
    first = body + embedding
    output = 0 if (shape.tie_word_embeddings and pp == 1) else v * h // tp
    last = body + h + output + (embedding if pp == 1 else 0)
    return max(first, last) if pp > 1 else last


def _activation_elements_per_token_layer(shape: Qwen3Shape, tp: int, sequence_parallel: bool = False,
                                         recompute: str | None = None, recompute_modules=("core_attn",)) -> float:
    """Elements one transformer layer keeps per token for backward (TE spec, flash attention).

    Sequence parallelism shards the h-wide tensors over TP; ``recompute="full"`` keeps only the layer input;
    ``selective`` drops the listed modules' inner activations (core_attn holds none with flash attention)."""
    h, d, i = shape.hidden_size, shape.head_dim, shape.intermediate_size
    nq, nkv = shape.num_attention_heads, shape.num_key_value_heads
    sp = tp if sequence_parallel else 1
    if recompute == "full":
        return h / sp
    modules = set(recompute_modules or ()) if recompute == "selective" else set()
    replicated = (2 if "layernorm" in modules else 4) * h / sp  # norm in/out, residual: ~4 h-wide tensors
    attention = (2 * (nq + 2 * nkv) * d + nq * d) / tp  # q,k,v before and after qk-norm/RoPE; attention output
    mlp = 0 if "mlp" in modules else 3 * i / tp  # fc1 output (gate and up, 2 i), SwiGLU output (i)
    return replicated + attention + mlp


def make_layout(cfg: TrainConfig, nodes: int, gpus_per_node: int) -> Layout:
    """Place trainer ranks and engines; raises PlanError naming what does not divide."""
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must be >= 1")
    la, p = cfg.launch, cfg.parallel
    tp, pp, etp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, la.engine_tp
    if la.engine_placement == "separate":
        if la.engine_nodes >= nodes:
            raise PlanError(f"launch.engine_nodes={la.engine_nodes} leaves no trainer node out of --nodes={nodes}")
        trainer_gpus, engine_gpus = (nodes - la.engine_nodes) * gpus_per_node, la.engine_nodes * gpus_per_node
    else:
        trainer_gpus = engine_gpus = nodes * gpus_per_node
    if tp > gpus_per_node:
        raise PlanError(f"parallel.tensor_model_parallel_size={tp} exceeds --gpus-per-node={gpus_per_node}: "
                        "tensor parallelism must stay inside a node's NVLink domain")
    if trainer_gpus % (tp * pp):
        raise PlanError(f"{trainer_gpus} trainer GPUs are not divisible by TP x PP = {tp} x {pp} "
                        f"(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)")
    if gpus_per_node % etp:
        raise PlanError(f"launch.engine_tp={etp} does not divide --gpus-per-node={gpus_per_node}: an engine would "
                        "straddle two nodes")
    return Layout(nodes=nodes, gpus_per_node=gpus_per_node, placement=la.engine_placement,
                  trainer_gpus=trainer_gpus, engine_gpus=engine_gpus, tp=tp, pp=pp, dp=trainer_gpus // (tp * pp),
                  engine_tp=etp, num_engines=engine_gpus // etp)


def make_plan(cfg: TrainConfig, shape: Qwen3Shape, nodes: int, gpus_per_node: int) -> MemoryPlan:
    """Compute the per-GPU memory of ``cfg`` on ``nodes`` x ``gpus_per_node``; raises PlanError for a layout that
    does not divide (memory fit is judged by :func:`check_plan`)."""
    lo = make_layout(cfg, nodes, gpus_per_node)
    try:
        check_parallel(shape, lo.tp, lo.pp, lo.trainer_gpus)
    except ParallelConfigError as e:
        raise PlanError(str(e)) from None
    if shape.num_attention_heads % lo.engine_tp:
        raise PlanError(f"launch.engine_tp={lo.engine_tp} does not divide num_attention_heads="
                        f"{shape.num_attention_heads}")
    la, p, ro = cfg.launch, cfg.parallel, cfg.rollout
    mg = merged(speed_defaults(lo.tp, gpu_with_te=True), split_megatron_args(cfg.megatron))
    tcfg = mg["transformer"]
    bf16 = cfg.model.params_dtype == "bfloat16"
    n = shape.num_parameters()
    per_gpu = stage_parameters(shape, lo.tp, lo.pp)
    param_bytes = 2 if bf16 else 4
    # Optimizer: Adam m and v in fp32, plus fp32 main weights when the model is bf16; DistOpt shards over DP.
    opt_bytes = (12 if bf16 else 8) / (lo.dp if p.use_distributed_optimizer else 1)
    response = max(ro.max_new_tokens, cfg.tapo.max_spliced_tokens if cfg.tapo.enabled else 0)
    seq = la.max_prompt_tokens + response
    tokens = p.max_tokens_per_micro_batch or p.micro_batch_size * seq  # packed budget, or padded rows
    layers_in_flight = (shape.num_hidden_layers // lo.pp) * lo.pp  # 1F1B: stage 0 holds PP micro-batches
    per_token_layer = _activation_elements_per_token_layer(
        shape, lo.tp, tcfg.get("sequence_parallel", False), tcfg.get("recompute_granularity"),
        tcfg.get("recompute_modules") or ("core_attn",))
    activations = layers_in_flight * tokens * per_token_layer * param_bytes
    if cfg.model.logprobs_path == "fused_linear":  # one [2048, 32768] tile and its gradient
        logits = 2048 * min(32768, shape.vocab_size / lo.tp) * (param_bytes + 4)
    else:  # the logits; their gradient is written in place (training/logprobs.py)
        logits = tokens * (shape.vocab_size / lo.tp) * param_bytes
    grad_bytes = 4 if mg["ddp"].get("grad_reduce_in_fp32", False) else param_bytes
    engine_weights = n * 2 / lo.engine_tp  # SGLang serves bf16
    kv_heads_per_gpu = math.ceil(shape.num_key_value_heads / lo.engine_tp)
    kv_per_token = 2 * shape.num_hidden_layers * kv_heads_per_gpu * shape.head_dim * 2  # K and V, bf16
    seqs_per_engine = math.ceil(ro.rollout_batch_size * ro.n_samples_per_prompt / lo.num_engines)
    kv_needed = seqs_per_engine * (la.max_prompt_tokens + ro.max_new_tokens) * kv_per_token
    static = per_gpu * (param_bytes + grad_bytes + opt_bytes)  # params, grads, optimizer
    total = la.gpu_memory_gb * GB
    reserved = la.reserved_gb * GB
    if lo.placement == "colocated":
        kv_available = total - reserved - static - engine_weights
        rollout_phase = engine_weights + min(kv_needed, max(kv_available, 0.0))
        trainer_peak = reserved + static + max(activations + logits, rollout_phase)
        engine_peak = 0.0
    else:
        kv_available = total * la.engine_mem_fraction - engine_weights
        trainer_peak = reserved + static + activations + logits
        engine_peak = total * la.engine_mem_fraction + reserved
    plan = MemoryPlan(
        layout=lo, num_parameters=n, params_per_gpu=per_gpu, params_gb=per_gpu * param_bytes / GB,
        grads_gb=per_gpu * grad_bytes / GB, optimizer_gb=per_gpu * opt_bytes / GB, activations_gb=activations / GB,
        logits_gb=logits / GB, engine_weights_gb=engine_weights / GB, kv_cache_needed_gb=kv_needed / GB,
        kv_cache_available_gb=max(kv_available, 0.0) / GB, reserved_gb=reserved / GB,
        trainer_peak_gb=trainer_peak / GB, engine_peak_gb=engine_peak / GB, gpu_memory_gb=la.gpu_memory_gb,
        seq_len=seq, sequences_per_engine=seqs_per_engine)
    min_kv = seq * kv_per_token
    if kv_available >= min_kv and kv_available < kv_needed:
        concurrent = int(kv_available // ((la.max_prompt_tokens + ro.max_new_tokens) * kv_per_token))
        plan.notes.append(f"the KV cache holds {concurrent} of {seqs_per_engine} rollouts per engine at once; "
                          "the engine queues the rest (slower rollout, not an error)")
    return plan


def check_plan(plan: MemoryPlan) -> MemoryPlan:
    """Refuse a plan that does not fit in GPU memory, naming the reason and the largest terms."""
    cap = plan.gpu_memory_gb
    terms = {"parameters": plan.params_gb, "gradients": plan.grads_gb, "optimizer states": plan.optimizer_gb,
             "activations": plan.activations_gb, "logits": plan.logits_gb}
    if plan.trainer_peak_gb > cap:
        top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(terms.items(), key=lambda kv: -kv[1])[:3])
        raise PlanError(f"does not fit: a trainer GPU needs {plan.trainer_peak_gb:.1f} GB > {cap:.0f} GB "
                        f"(largest: {top} GB); raise TP/PP/DP, lower parallel.micro_batch_size / "
                        "max_tokens_per_micro_batch or add nodes")
    one_seq = plan.kv_cache_needed_gb / max(1, plan.sequences_per_engine)
    if plan.kv_cache_available_gb < one_seq:
        raise PlanError(f"does not fit: the rollout engine has {plan.kv_cache_available_gb:.1f} GB for its KV cache "
                        f"after {plan.engine_weights_gb:.1f} GB of weights"
                        + ("" if plan.layout.placement == "separate" else
                           f" and {plan.static_gb:.1f} GB of resident trainer state")
                        + f", less than one {plan.seq_len}-token sequence ({one_seq:.2f} GB); raise launch.engine_tp"
                        + (" or use launch.engine_placement=separate" if plan.layout.placement == "colocated" else ""))
    return plan


def plan_recipe(cfg: TrainConfig, nodes: int, gpus_per_node: int) -> MemoryPlan:
    """``make_plan`` + ``check_plan`` for a loaded recipe."""
    from tapo_megatron.models.qwen3 import shape_from_config

    return check_plan(make_plan(cfg, shape_from_config(cfg.model), nodes, gpus_per_node))
