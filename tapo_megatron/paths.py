"""Where the project's files live: the repo root and the shared data folder (real eval sets, tokenizer, configs)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The shared data folder: $TAPO_SHARED_DATA, else ``<repo>/../shared/data``."""
    env = os.environ.get("TAPO_SHARED_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared data folder not found at {path}; set TAPO_SHARED_DATA to the folder holding aime2024.jsonl, "
            "qwen3_tokenizer/ and qwen3_configs.json"
        )
    return path
