"""Where a Megatron checkpoint is on disk: the actor's save directories and their ``latest`` pointer.

    save_dir/latest_checkpointed_iteration.txt     "3"   (Megatron's name for the pointer)
    save_dir/iter_0000003/state.json               the actor's checkpoint (model, optimizer, RNG, loop state)

``resolve_checkpoint`` accepts either the save directory (follows the pointer) or an ``iter_*`` directory;
``is_megatron_checkpoint`` also accepts ``tapo convert hf-to-mcore`` output (``model/`` + ``hf_config.json``).
"""
from __future__ import annotations

from pathlib import Path

from tapo_megatron.errors import CheckpointNotFoundError

LATEST_FILE = "latest_checkpointed_iteration.txt"  # Megatron's name for the pointer to the newest checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint dir, else the one its ``latest`` pointer names."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    pointer = path / LATEST_FILE
    if not pointer.is_file():
        raise CheckpointNotFoundError(f"no checkpoint in {path} (neither state.json nor {LATEST_FILE})")
    ckpt = path / f"iter_{int(pointer.read_text().strip()):07d}"
    if not (ckpt / "state.json").is_file():
        raise CheckpointNotFoundError(f"{pointer} names {ckpt}, which is missing or incomplete")
    return ckpt


def has_checkpoint(path: str | Path) -> bool:
    try:
        resolve_checkpoint(path)
        return True
    except FileNotFoundError:
        return False


def is_megatron_checkpoint(path: str | Path) -> bool:
    """An actor checkpoint (or save dir), or ``hf_to_mcore`` output."""
    path = Path(path)
    return has_checkpoint(path) or ((path / "model").is_dir() and (path / "hf_config.json").is_file())
