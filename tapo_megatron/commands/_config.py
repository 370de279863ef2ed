"""What several commands share: ``--config R.yaml`` plus ``section.field=value`` overrides."""
from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> argparse.ArgumentParser:
    p.add_argument("--config", required=required, default=None, help="recipe YAML (tapo_megatron/recipes/)")
    p.add_argument("overrides", nargs="*", help="config overrides section.field=value")
    return p


def load(args):
    from tapo_megatron.config import load_config

    return load_config(args.config, args.overrides)
