"""The Qwen3 HF <-> Megatron-Core mapping (the one place it lives) and the model-side export / load.

Mapping (HF name under ``model.layers.{i}.`` <-> Megatron name under ``decoder.layers.{i}.``):

====================================  ===============================================  =========  ============
HF                                    Megatron (local spec | TE spec)                  TP split   transform
====================================  ===============================================  =========  ============
input_layernorm.weight                input_layernorm.weight |                         replicated identity
                                      self_attention.linear_qkv.layer_norm_weight
self_attn.{q,k,v}_proj.weight         self_attention.linear_qkv.weight                 dim 0      qkv interleave
self_attn.q_norm.weight / k_norm      self_attention.{q,k}_layernorm.weight            replicated identity
self_attn.o_proj.weight               self_attention.linear_proj.weight                dim 1      identity
post_attention_layernorm.weight       pre_mlp_layernorm.weight |                       replicated identity
                                      mlp.linear_fc1.layer_norm_weight
mlp.{gate,up}_proj.weight             mlp.linear_fc1.weight                            gate/up    [gate; up]
mlp.down_proj.weight                  mlp.linear_fc2.weight                            dim 1      identity
model.embed_tokens.weight             embedding.word_embeddings.weight (first stage)   dim 0      identity
model.norm.weight                     decoder.final_layernorm.weight (last stage)      replicated identity
lm_head.weight (untied only)          output_layer.weight (last stage)                 dim 0      identity
====================================  ===============================================  =========  ============

Layouts, for ``ng`` KV groups of ``nq / ng`` query heads, head size ``d``:

* "full" Megatron tensors are what TP=1 holds, and what a Megatron distributed checkpoint stores globally:
  ``linear_qkv`` is ``[ng * (nq/ng + 2) * d, hidden]`` with, per group g, its ``nq/ng`` q heads, its k head, its
  v head; ``linear_fc1`` is ``[gate; up]`` = ``[2 * I, hidden]``.
* A TP rank r of ``tp`` holds a contiguous dim-0 slice of the full QKV (whole groups ``r*ng/tp ...``), and for fc1
  ``[gate_r; up_r]`` (its slice of gate, then its slice of up), which is why fc1 is not a plain dim-0 slice.
* Layer indices: Megatron's ``decoder.layers.{i}`` is stage-local; the HF index is
  ``layer.layer_number - 1`` (global). Tied embeddings: HF has no ``lm_head``; with PP > 1 Megatron keeps a copy
  of the embedding as ``output_layer.weight`` on the last stage.

``export_hf_weights`` streams HF-named, TP-gathered, stage-local tensors in size-bounded buckets (used by
``mcore``-side conversion and by the weight sync to rollout engines); ``load_hf_weights`` fills a stage from any
``Mapping[str, Tensor]`` of HF tensors (e.g. a lazy ``HFCheckpointReader``).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tapo_megatron.convert.hf_io import ConversionError
from tapo_megatron.models.qwen3 import Qwen3Shape
from tapo_megatron.parallel import ParallelContext

# TP split kinds.
REPLICATED, DIM0, DIM1, GATE_UP = "replicated", "dim0", "dim1", "gate_up"
# HF <-> full-Megatron transforms.
IDENTITY, QKV = "identity", "qkv"


@dataclass(frozen=True)
class Slot:
    """One Megatron parameter and the HF tensor(s) it corresponds to.

    ``mcore``: accepted local parameter names, local spec first (TE spec name second where it differs);
    ``ckpt_key``: its key in a Megatron distributed checkpoint (layer params stacked over a leading layer axis);
    ``hf``: HF name(s), in the order the transform concatenates them; ``tp``: how TP splits it;
    ``transform``: how the full Megatron tensor relates to the HF tensors.
    """

    mcore: tuple[str, ...]
    ckpt_key: str
    hf: tuple[str, ...]
    tp: str
    transform: str = IDENTITY


# Per-layer slots, names relative to decoder.layers.{i}. / model.layers.{i}. ; order = export order.
LAYER_SLOTS: tuple[Slot, ...] = (
    Slot(("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
         "decoder.layers.self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",), REPLICATED),
    Slot(("self_attention.linear_qkv.weight",), "decoder.layers.self_attention.linear_qkv.weight",
         ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), DIM0, QKV),
    Slot(("self_attention.q_layernorm.weight",), "decoder.layers.self_attention.q_layernorm.weight",
         ("self_attn.q_norm.weight",), REPLICATED),
    Slot(("self_attention.k_layernorm.weight",), "decoder.layers.self_attention.k_layernorm.weight",
         ("self_attn.k_norm.weight",), REPLICATED),
    Slot(("self_attention.linear_proj.weight",), "decoder.layers.self_attention.linear_proj.weight",
         ("self_attn.o_proj.weight",), DIM1),
    Slot(("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
         "decoder.layers.mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), REPLICATED),
    Slot(("mlp.linear_fc1.weight",), "decoder.layers.mlp.linear_fc1.weight",
         ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP),
    Slot(("mlp.linear_fc2.weight",), "decoder.layers.mlp.linear_fc2.weight", ("mlp.down_proj.weight",), DIM1),
)
EMBEDDING = Slot(("embedding.word_embeddings.weight",), "embedding.word_embeddings.weight",
                 ("model.embed_tokens.weight",), DIM0)
FINAL_NORM = Slot(("decoder.final_layernorm.weight",), "decoder.final_layernorm.weight", ("model.norm.weight",),
                  REPLICATED)
OUTPUT = Slot(("output_layer.weight",), "output_layer.weight", ("lm_head.weight",), DIM0)

# HF keys that carry no weights of their own and are skipped when reading (old checkpoints store RoPE buffers).
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def hf_shapes(shape: Qwen3Shape) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a checkpoint of this shape holds, with its shape, in export order."""
    h, d, i_ = shape.hidden_size, shape.head_dim, shape.intermediate_size
    q, kv = shape.num_attention_heads * d, shape.num_key_value_heads * d
    per_layer = {
        "input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (h, q), "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i_, h), "mlp.up_proj.weight": (i_, h), "mlp.down_proj.weight": (h, i_),
    }
    out = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for layer in range(shape.num_hidden_layers):
        out.update({hf_layer_prefix(layer) + k: v for k, v in per_layer.items()})
    out["model.norm.weight"] = (h,)
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def ckpt_tensor_shapes(shape: Qwen3Shape) -> dict[str, tuple[int, ...]]:
    """Every tensor key of a Megatron distributed checkpoint of this shape, with its global (TP=1) shape.

    Layer parameters are stacked over a leading ``num_hidden_layers`` axis; ``output_layer.weight`` exists only
    when the embeddings are untied (a tied last stage saves its copy under the embedding's key, as a replica).
    """
    h, d, i_, v, L = (shape.hidden_size, shape.head_dim, shape.intermediate_size, shape.vocab_size,
                      shape.num_hidden_layers)
    nq, ng = shape.num_attention_heads, shape.num_key_value_heads
    per_layer = dict(zip([s.ckpt_key for s in LAYER_SLOTS], [
        (h,), ((nq + 2 * ng) * d, h), (d,), (d,), (h, nq * d), (h,), (2 * i_, h), (h, i_)]))
    out = {EMBEDDING.ckpt_key: (v, h)}
    out.update({k: (L, *s) for k, s in per_layer.items()})
    out[FINAL_NORM.ckpt_key] = (h,)
    if not shape.tie_word_embeddings:
        out[OUTPUT.ckpt_key] = (v, h)
    return out


def check_hf_tensors(shape: Qwen3Shape, available: Mapping[str, tuple[int, ...]], source: str = "HF checkpoint",
                     needed: set[str] | None = None) -> None:
    """Refuse tensors that do not match the config: missing, extra or wrongly shaped keys, each named.

    ``available``: HF name -> shape. ``needed``: the names that must be present (default: all of ``hf_shapes``).
    A tied model may still carry an ``lm_head.weight`` (some exporters write it); it is ignored.
    """
    expected = hf_shapes(shape)
    needed = set(expected) if needed is None else needed
    missing = [k for k in expected if k in needed and k not in available]
    if missing:
        raise ConversionError(f"{source} is missing tensor(s) the config requires: {', '.join(missing[:8])}"
                              + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    allowed_extra = {"lm_head.weight"} if shape.tie_word_embeddings else set()
    extra = sorted(k for k in available if k not in expected and k not in allowed_extra
                   and not k.endswith(_IGNORED_HF_SUFFIXES))
    if extra:
        raise ConversionError(
            f"{source} has tensor(s) a Qwen3 model with this config does not have: {', '.join(extra[:8])} "
            f"(config: num_hidden_layers={shape.num_hidden_layers}, tie_word_embeddings={shape.tie_word_embeddings})")
    for name, want in expected.items():
        if name in available and tuple(available[name]) != want:
            raise ConversionError(
                f"tensor {name} has shape {tuple(available[name])} but the config implies {want} "
                f"({_shape_fields(name)})")


def _shape_fields(name: str) -> str:
    """Which config fields determine the shape of an HF tensor (for error messages)."""
    if "embed_tokens" in name or "lm_head" in name:
        return "vocab_size x hidden_size"
    if "q_proj" in name or "o_proj" in name:
        return "num_attention_heads * head_dim and hidden_size"
    if "k_proj" in name or "v_proj" in name:
        return "num_key_value_heads * head_dim and hidden_size"
    if "q_norm" in name or "k_norm" in name:
        return "head_dim"
    if "_proj" in name:
        return "intermediate_size and hidden_size"
    return "hidden_size"


# ----------------------------------------------------------------------------------------------------------------
# Full-Megatron <-> HF transforms (pure tensor functions; no process groups).


def qkv_from_hf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Qwen3Shape) -> torch.Tensor:
    """HF q/k/v ``[nq*d, h], [ng*d, h], [ng*d, h]`` -> Megatron ``[ng*(nq/ng+2)*d, h]``, interleaved per group."""
    ng, d = shape.num_key_value_heads, shape.head_dim
    per = shape.num_attention_heads // ng
    h = q.shape[-1]
    fused = torch.cat([q.reshape(ng, per * d, h), k.reshape(ng, d, h), v.reshape(ng, d, h)], dim=1)
    return fused.reshape(ng * (per + 2) * d, h)


def qkv_to_hf(qkv: torch.Tensor, shape: Qwen3Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``qkv_from_hf`` for a full (all groups) tensor."""
    ng, d = shape.num_key_value_heads, shape.head_dim
    per = shape.num_attention_heads // ng
    h = qkv.shape[-1]
    grouped = qkv.reshape(ng, (per + 2) * d, h)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()


def full_from_hf(slot: Slot, tensors: list[torch.Tensor], shape: Qwen3Shape) -> torch.Tensor:
    """HF tensors of a slot -> the full (TP=1) Megatron tensor."""
    if slot.transform == QKV:
        return qkv_from_hf(*tensors, shape)
    if slot.tp == GATE_UP:
        return torch.cat(tensors, dim=0)
    return tensors[0]


def full_to_hf(slot: Slot, full: torch.Tensor, shape: Qwen3Shape) -> list[torch.Tensor]:
    """The full (TP=1) Megatron tensor of a slot -> its HF tensors, in ``slot.hf`` order."""
    if slot.transform == QKV:
        return list(qkv_to_hf(full, shape))
    if slot.tp == GATE_UP:
        return [t.contiguous() for t in torch.chunk(full, 2, dim=0)]
    return [full]


def tp_shard(slot: Slot, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's piece of a full Megatron tensor."""
    if tp == 1 or slot.tp == REPLICATED:
        return full
    if slot.tp == DIM0:
        return torch.chunk(full, tp, dim=0)[rank]
    if slot.tp == DIM1:
        return torch.chunk(full, tp, dim=1)[rank]
    gate, up = torch.chunk(full, 2, dim=0)  # GATE_UP: rank r holds [gate_r; up_r]
    return torch.cat([torch.chunk(gate, tp, dim=0)[rank], torch.chunk(up, tp, dim=0)[rank]], dim=0)


def tp_unshard(slot: Slot, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``tp_shard``: the per-rank pieces (in TP rank order) -> the full tensor."""
    if len(shards) == 1 or slot.tp == REPLICATED:
        return shards[0]
    if slot.tp == DIM0:
        return torch.cat(shards, dim=0)
    if slot.tp == DIM1:
        return torch.cat(shards, dim=1)
    halves = [torch.chunk(s, 2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


# ----------------------------------------------------------------------------------------------------------------
# Model side.


def unwrap_model(model):
    """The ``GPTModel`` under DDP / Float16Module wrappers (each wraps as ``.module``)."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def shape_of_model(model) -> Qwen3Shape:
    """The Qwen3 shape of a Megatron ``GPTModel`` built by ``build_qwen3`` (any stage)."""
    m = unwrap_model(model)
    c = m.config
    return Qwen3Shape(
        vocab_size=m.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_query_groups, head_dim=c.kv_channels, rms_norm_eps=c.layernorm_epsilon,
        tie_word_embeddings=m.share_embeddings_and_output_weights,
    )


def _param(params: dict[str, torch.nn.Parameter], prefix: str, slot: Slot) -> tuple[str, torch.nn.Parameter]:
    for name in slot.mcore:
        if prefix + name in params:
            return prefix + name, params[prefix + name]
    raise ConversionError(f"Megatron model has no parameter {' or '.join(prefix + n for n in slot.mcore)}")


@dataclass(frozen=True)
class StageItem:
    """One Megatron parameter of this stage and the HF names it maps to."""

    slot: Slot
    mcore_name: str
    param: torch.nn.Parameter
    hf_names: tuple[str, ...]


def stage_items(model) -> list[StageItem]:
    """This stage's parameters in export order: embedding (first stage), layers (global index), final norm and
    lm_head (last stage; lm_head only when untied). The last stage's tied embedding copy is not listed."""
    m = unwrap_model(model)
    params = dict(m.named_parameters())
    items: list[StageItem] = []

    def add(slot: Slot, prefix: str, hf_prefix: str) -> None:
        name, p = _param(params, prefix, slot)
        items.append(StageItem(slot, name, p, tuple(hf_prefix + h for h in slot.hf)))

    if m.pre_process:
        add(EMBEDDING, "", "")
    for local, layer in enumerate(m.decoder.layers):
        for slot in LAYER_SLOTS:
            add(slot, f"decoder.layers.{local}.", hf_layer_prefix(layer.layer_number - 1))
    if m.post_process:
        add(FINAL_NORM, "", "")
        if not m.share_embeddings_and_output_weights:
            add(OUTPUT, "", "")
    return items


def _tp_gather(local: torch.Tensor, slot: Slot, ctx: ParallelContext) -> torch.Tensor:
    if ctx.tp_size == 1 or slot.tp == REPLICATED:
        return local
    local = local.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(shards, local, group=ctx.tp_group)
    return tp_unshard(slot, shards)


def export_hf_weights(model, ctx: ParallelContext, bucket_bytes: int = 512 * 2**20
                      ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield this stage's weights as HF-named full tensors, in buckets of at most ``bucket_bytes``.

    Inputs: a (possibly DDP-wrapped) Qwen3 ``GPTModel`` stage and its ``ParallelContext``. Every rank of the TP
    group must iterate in lockstep (each parameter is all-gathered over ``ctx.tp_group``); every TP rank receives
    the same buckets. Stage-local: a PP stage yields its own layers under their global HF indices; the embedding
    comes from the first stage only (tied or not), ``model.norm`` and (untied) ``lm_head`` from the last.
    Tensors keep the model's dtype and device and are fresh (not views of the parameters) when TP > 1 or the
    transform splits them; for TP=1 identity slots they are detached parameter views - copy before mutating.
    Order is deterministic (``stage_items`` order, then ``Slot.hf`` order). A tensor larger than
    ``bucket_bytes`` is yielded in a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
    shape = shape_of_model(model)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    with torch.no_grad():
        for item in stage_items(model):
            full = _tp_gather(item.param.detach(), item.slot, ctx)
            for name, tensor in zip(item.hf_names, full_to_hf(item.slot, full, shape)):
                nbytes = tensor.numel() * tensor.element_size()
                if bucket and size + nbytes > bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
                bucket.append((name, tensor))
                size += nbytes
    if bucket:
        yield bucket


def load_hf_weights(model, ctx: ParallelContext, source: Mapping[str, torch.Tensor], progress=None) -> None:
    """Fill this rank's stage of a Qwen3 ``GPTModel`` from HF-named tensors, slicing this rank's TP shard.

    ``source``: any mapping ``hf_name -> Tensor`` (a dict, or a lazy ``HFCheckpointReader`` that reads one tensor
    per lookup). Only the tensors this stage needs are read, one slot (at most three HF tensors) at a time.
    Tied embeddings with PP > 1: the last stage's ``output_layer.weight`` copy is filled from
    ``model.embed_tokens.weight`` too. Raises ``ConversionError`` naming any missing, extra or misshaped tensor.
    ``progress``: optional callable(n) invoked after each parameter (e.g. ``tqdm.update``).
    """
    m = unwrap_model(model)
    shape = shape_of_model(m)
    items = stage_items(m)
    needed = {n for it in items for n in it.hf_names}
    tied_copy = None
    if m.post_process and m.share_embeddings_and_output_weights and not m.pre_process:
        tied_copy = m.output_layer.weight
        needed.add(EMBEDDING.hf[0])
    if isinstance(source, Mapping) and hasattr(source, "info"):
        available = {k: v.shape for k, v in source.info.items()}  # headers only: nothing read yet
    else:
        available = {k: tuple(source[k].shape) for k in source.keys()}
    check_hf_tensors(shape, available, needed=needed)
    with torch.no_grad():
        for item in items:
            full = full_from_hf(item.slot, [source[n] for n in item.hf_names], shape)
            local = tp_shard(item.slot, full, ctx.tp_size, ctx.tp_rank)
            if tuple(local.shape) != tuple(item.param.shape):
                raise ConversionError(
                    f"{item.mcore_name}: HF tensors {', '.join(item.hf_names)} give a TP shard of shape "
                    f"{tuple(local.shape)}, the model parameter has {tuple(item.param.shape)}")
            item.param.copy_(local)
            if progress is not None:
                progress(1)
        if tied_copy is not None:
            full = source[EMBEDDING.hf[0]]
            tied_copy.copy_(tp_shard(EMBEDDING, full, ctx.tp_size, ctx.tp_rank))
