"""Packaged recipes (``<name>.yaml``) and parallelism presets (``h100_<nodes>x<gpus>.yaml``).

A recipe is a full ``TrainConfig`` YAML. A preset holds, per model name (``model.name``), the ``parallel`` and
``launch`` values for one cluster shape; :func:`resolve_recipe` deep-merges the preset entry over the recipe, then
applies ``section.field=value`` overrides -- the same config system as ``load_config``, three layers deep.

    cfg = load_recipe("qwen3_8b_tapo", preset="h100_1x8", overrides=["train_iters=10"])
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from tapo_megatron.config import ConfigError, TrainConfig, apply_overrides, expand_env, from_dict

RECIPES_DIR = Path(__file__).resolve().parent


def recipe_path(name: str | Path) -> Path:
    """A packaged recipe name (``"qwen3_8b_tapo"``) or a YAML path -> the file; the error lists the names."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    stem = str(name).removesuffix(".yaml")
    packaged = RECIPES_DIR / f"{stem}.yaml"
    if "/" not in stem and packaged.is_file() and not stem.startswith("h100_"):
        return packaged
    raise ConfigError(f"recipe {str(name)!r} not found; packaged recipes: {', '.join(list_recipes())}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.startswith("h100_"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("h100_*.yaml"))


def preset_for(nodes: int, gpus_per_node: int) -> str | None:
    """The packaged preset for this cluster shape (``h100_<nodes>x<gpus>``), or None if there is none."""
    name = f"h100_{nodes}x{gpus_per_node}"
    return name if name in list_presets() else None


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_preset(name: str | Path) -> dict:
    """A preset file -> ``{"nodes": int, "gpus_per_node": int, "models": {model name: {section: {...}}}}``."""
    path = Path(name) if Path(name).suffix in (".yaml", ".yml") else RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset {str(name)!r} not found; packaged presets: {', '.join(list_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    for key in ("nodes", "gpus_per_node", "models"):
        if key not in data:
            raise ConfigError(f"preset {path}: missing field {key!r}")
    return data


def resolve_recipe(name: str | Path, preset: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Recipe + preset entry + overrides, validated, with ``${VAR}`` references kept as written (so a config
    resolved on a login node can be written into a job and expanded inside the container)."""
    data = yaml.safe_load(recipe_path(name).read_text()) or {}
    if preset:
        p = load_preset(preset)
        model_name = (data.get("model") or {}).get("name", "")
        if model_name not in p["models"]:
            raise ConfigError(f"preset {preset!r} has no entry for model.name={model_name!r}; "
                              f"it covers: {', '.join(sorted(p['models']))}")
        data = _deep_merge(data, p["models"][model_name])
    cfg = from_dict(TrainConfig, data)
    apply_overrides(cfg, list(overrides))
    return cfg.validate()


def load_recipe(name: str | Path, preset: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """:func:`resolve_recipe` with ``${VAR}`` references expanded from this process's environment."""
    return expand_env(resolve_recipe(name, preset, overrides)).validate()
