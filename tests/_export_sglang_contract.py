"""Runs in .venv-sglang (tests/test_export.py): an exported HF directory against SGLang 0.5.23's own Qwen3 loader.

``python tests/_export_sglang_contract.py EXPORT_DIR`` exits 0 when every exported weight lands on a parameter.

SGLang's ``Qwen3ForCausalLM`` cannot be built on CPU (its layers need the CUDA kernel stack), and its module does not
import here (einops, sgl_kernel), so this script takes SGLang's code from the installed wheel's source:
* ``Qwen3ForCausalLM.load_weights`` (sglang/srt/models/qwen3.py) is compiled from that file and run unchanged,
  with its module-level helpers imported from SGLang itself (``add_prefix``, ``get_layer_id``,
  ``default_weight_loader``, ``maybe_remap_kv_scale_name``), so its stacked_params_mapping (q/k/v -> qkv_proj,
  gate/up -> gate_up_proj), tie handling and skip rules are SGLang's;
* the parameter names it loads into are read off the ``__init__`` assignments of SGLang's module classes
  (``self.qkv_proj = QKVParallelLinear(...)`` etc. in qwen3.py / qwen2.py): every attribute built by a class that
  owns a ``weight`` becomes ``<path>.weight``; a tied head shares the embedding (``named_parameters`` dedups it).
Each parameter's ``weight_loader`` records what it received; the check fails on a name the loader cannot place
(SGLang logs "Parameter ... not found"), a stacked parameter missing a shard, or a parameter nothing loaded.
"""
from __future__ import annotations

import ast
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

import sglang
from sglang.srt.layers.utils import get_layer_id
from sglang.srt.model_loader.weight_utils import default_weight_loader, maybe_remap_kv_scale_name
from sglang.srt.utils import add_prefix

MODELS = Path(sglang.__file__).parent / "srt" / "models"
# Layer classes of sglang.srt.layers that own a ``weight`` parameter (linear.py, layernorm.py,
# vocab_parallel_embedding.py); RadixAttention, SiluAndMul, LogitsProcessor, Pooler, PPMissingLayer own none.
WEIGHT_LAYERS = {"QKVParallelLinear", "RowParallelLinear", "MergedColumnParallelLinear", "ColumnParallelLinear",
                 "RMSNorm", "VocabParallelEmbedding", "ParallelLMHead"}
SHARDS = {"qkv_proj": {"q", "k", "v"}, "gate_up_proj": {0, 1}}  # what each stacked parameter must receive


def _classes(*files: str) -> dict[str, ast.ClassDef]:
    out = {}
    for name in files:
        for node in ast.parse((MODELS / name).read_text()).body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, node)  # qwen3.py first: its classes win over qwen2's
    return out


def _init_modules(cls: ast.ClassDef) -> dict[str, set[str]]:
    """``self.attr = Ctor(...)`` in ``__init__`` (any branch): attr -> constructor names."""
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    out: dict[str, set[str]] = {}
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            fn = node.value.func
            ctor = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
            for target in node.targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                    out.setdefault(target.attr, set()).add(ctor)
    return out


def sglang_parameter_names(num_layers: int, tied: bool) -> set[str]:
    classes = _classes("qwen3.py", "qwen2.py")
    # Qwen3Model(Qwen2Model) builds its layers with Qwen3DecoderLayer (qwen3.py), whose MLP is Qwen2MLP as Qwen3MLP
    alias = {"Qwen3Model": "Qwen2Model", "Qwen3MLP": "Qwen2MLP"}

    def walk(cls_name: str, prefix: str) -> set[str]:
        cls_name = alias.get(cls_name, cls_name)
        names = set()
        for attr, ctors in _init_modules(classes[cls_name]).items():
            if ctors & WEIGHT_LAYERS:
                names.add(f"{prefix}{attr}.weight")
            for ctor in ctors & (set(classes) | set(alias)):
                names |= walk(ctor, f"{prefix}{attr}.")
        return names

    names = walk("Qwen3ForCausalLM", "")
    layer = walk("Qwen3DecoderLayer", "")
    names |= {f"model.layers.{i}.{n}" for i in range(num_layers) for n in layer}  # make_pp_layers
    if tied:
        names.discard("lm_head.weight")  # lm_head = model.embed_tokens: one parameter, named once
    return names


def sglang_load_weights():
    """SGLang's ``Qwen3ForCausalLM.load_weights``, compiled from its source with its own helpers as globals."""
    source = (MODELS / "qwen3.py").read_text()
    cls = _classes("qwen3.py")["Qwen3ForCausalLM"]
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "load_weights")
    namespace = {"add_prefix": add_prefix, "get_layer_id": get_layer_id, "default_weight_loader":
                 default_weight_loader, "maybe_remap_kv_scale_name": maybe_remap_kv_scale_name,
                 "logger": logging.getLogger("sglang_qwen3_loader"), "torch": torch}
    exec(compile("from typing import Iterable, Tuple\n" + ast.get_source_segment(source, fn).replace("\n    ", "\n"),
                 str(MODELS / "qwen3.py"), "exec"), namespace)
    return namespace["load_weights"]


def check(export_dir: Path) -> list[str]:
    import json

    config = json.loads((export_dir / "config.json").read_text())
    L, tied = config["num_hidden_layers"], bool(config.get("tie_word_embeddings"))
    received: dict[str, list] = {}

    def param(name: str):
        p = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        p.weight_loader = lambda _p, w, shard=None: received.setdefault(name, []).append(shard)
        return p

    params = {n: param(n) for n in sglang_parameter_names(L, tied)}
    stand_in = SimpleNamespace(named_parameters=lambda: iter(params.items()), config=SimpleNamespace(
        tie_word_embeddings=tied), pp_group=SimpleNamespace(world_size=1, is_last_rank=True),
        model=SimpleNamespace(start_layer=0, end_layer=L))
    weights = []
    for f in sorted(export_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            weights += [(k, h.get_tensor(k)) for k in h.keys()]
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("sglang_qwen3_loader").addHandler(handler)
    sglang_load_weights()(stand_in, iter(weights))
    problems = list(warnings)
    for name in sorted(params):
        got = received.get(name)
        stacked = next((s for key, s in SHARDS.items() if name.endswith(key + ".weight")), None)
        if not got:
            problems.append(f"SGLang parameter {name} received no weight")
        elif stacked is not None and set(got) != stacked:
            problems.append(f"SGLang parameter {name} received shards {got}, needs {sorted(map(str, stacked))}")
    if not weights:
        problems.append(f"no safetensors in {export_dir}")
    return problems


if __name__ == "__main__":
    problems = check(Path(sys.argv[1]))
    print("\n".join(problems) or f"ok: every weight of {sys.argv[1]} placed by SGLang's Qwen3 loader")
    sys.exit(1 if problems else 0)
