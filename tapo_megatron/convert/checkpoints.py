"""Where a Megatron checkpoint is on disk, and the rules that keep a save directory usable after any crash.

    save_dir/latest_checkpointed_iteration.txt     "3"   (Megatron's name for the pointer)
    save_dir/iter_0000003/state.json               the actor's checkpoint (model, optimizer, RNG, loop state)
    save_dir/iter_0000003/manifest.json            size + sha256 of every other file of the checkpoint

Rules (``actor.save_checkpoint`` follows them, ``resolve_checkpoint`` relies on them):
- a checkpoint becomes visible only when complete: written to ``iter_N.tmp``, every file fsynced, the manifest
  written last, then ``iter_N.tmp`` renamed to ``iter_N``, then the pointer replaced by an atomic rename;
- on load, the manifest is checked (sizes always, sha256 with ``verify="sha256"``); a bad checkpoint is skipped,
  with the reason printed, and the newest good one is used; a missing or dangling pointer is not fatal either;
- a save directory that holds checkpoints but no usable one is an error, never a silent fresh start.

``resolve_checkpoint`` accepts either the save directory or an ``iter_*`` directory; ``is_megatron_checkpoint`` also
accepts ``tapo convert hf-to-mcore`` output (``model/`` + ``hf_config.json``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Sequence

from tapo_megatron.errors import CheckpointError, CheckpointNotFoundError

LATEST_FILE = "latest_checkpointed_iteration.txt"  # Megatron's name for the pointer to the newest checkpoint
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
_ITER = re.compile(r"^iter_(\d{7,})$")
_HASH_CHUNK = 8 << 20

# (checkpoint dir, manifest entries to check) -> problems found; the actor splits the entries over its ranks.
Verifier = Callable[[Path, Sequence[tuple[str, dict]]], list[str]]


def error_summary(exc: BaseException) -> str:
    """One line for a failure deep in a checkpoint library: the innermost cause's message, looking inside
    torch DCP's ``CheckpointException`` (whose text is a traceback per rank)."""
    seen = exc
    while True:
        failures = getattr(seen, "failures", None)
        if isinstance(failures, dict) and failures:  # {rank: (exception, traceback)}
            inner = next(iter(failures.values()))
            seen = inner[0] if isinstance(inner, tuple) else inner
        elif seen.__cause__ is not None or seen.__context__ is not None:
            seen = seen.__cause__ or seen.__context__
        else:
            break
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[0]}" if text else type(seen).__name__


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def checkpoint_dirs(save_dir: str | Path) -> list[Path]:
    """The ``iter_N`` directories of a save directory, newest first (``.tmp`` leftovers excluded)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in save_dir.iterdir() if p.is_dir() and (m := _ITER.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def checkpoint_files(ckpt: Path) -> list[str]:
    """Every file of a (tmp) checkpoint directory but the manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def fsync_path(path: Path) -> None:
    """fsync a file or directory (directories: so that renames inside it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """``path`` replaced by ``text`` in one step: write ``path.tmp``, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_manifest(ckpt: Path, digests: dict[str, dict]) -> None:
    write_atomic(ckpt / MANIFEST_FILE, json.dumps({"files": digests}, indent=1, sort_keys=True))


def publish_checkpoint(tmp: Path, final: Path, iteration: int, keep_last: int = 0) -> None:
    """Make a complete ``tmp`` checkpoint visible as ``final``, point ``latest`` at it, rotate old ones.

    An existing ``final`` (a run resumed from an older checkpoint saves this iteration again) is moved aside first
    and removed only after the rename, so no moment leaves the save directory without a complete checkpoint."""
    save_dir = final.parent
    aside = final.with_name(final.name + ".old.tmp")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_path(save_dir)
    write_atomic(save_dir / LATEST_FILE, str(iteration))
    shutil.rmtree(aside, ignore_errors=True)
    if keep_last > 0:
        for old in checkpoint_dirs(save_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_tmp(save_dir: str | Path) -> list[Path]:
    """Remove what an interrupted save left behind (``iter_*.tmp``, ``*.tmp`` pointers); returns what was removed.
    Call only while holding the directory's run lock (``logging.runlock``): another live run's save looks the same."""
    save_dir = Path(save_dir)
    removed = []
    if save_dir.is_dir():
        for p in save_dir.iterdir():
            if p.name.endswith(".tmp"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p)
    return removed


def verify_entries(ckpt: Path, entries: Sequence[tuple[str, dict]], sha256: bool = True) -> list[str]:
    """Problems of ``entries`` (relative path, {size, sha256}) of ``ckpt``: missing, wrong size, wrong hash."""
    problems = []
    for rel, want in entries:
        path = ckpt / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{rel} is {size} bytes, the manifest says {want['size']} (truncated?)")
        elif sha256 and file_digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{rel} does not match its sha256 in the manifest (corrupted)")
    return problems


def local_verifier(sha256: bool = True) -> Verifier:
    return lambda ckpt, entries: verify_entries(ckpt, entries, sha256)


def checkpoint_problem(ckpt: Path, verifier: Verifier | None = None) -> str | None:
    """None if ``ckpt`` is a complete, intact checkpoint, else why not (names the file)."""
    verifier = verifier or local_verifier()
    manifest_path = ckpt / MANIFEST_FILE
    if manifest_path.is_file():
        try:
            files = json.loads(manifest_path.read_text())["files"]
        except (ValueError, KeyError, TypeError) as e:
            return f"{manifest_path} is unreadable ({e})"
        problems = verifier(ckpt, sorted(files.items()))
        if problems:
            return f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    # No manifest: a checkpoint from before manifests, or converted; at least its state must read.
    state = ckpt / STATE_FILE
    if not state.is_file():
        return f"{state} is missing (the save did not complete)"
    try:
        json.loads(state.read_text())["iteration"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{state} is unreadable ({type(e).__name__}: {e})"
    return None


def resolve_checkpoint(path: str | Path, verifier: Verifier | None = None, report: Callable[[str], None] = print
                       ) -> Path:
    """The checkpoint to load from ``path``: ``path`` itself if it is a checkpoint directory (refused if bad), else
    the newest intact ``iter_N`` of the save directory ``path``, whatever its pointer says. Skipped checkpoints and
    a missing or dangling pointer are reported (one line each); no usable checkpoint raises, naming each reason."""
    path = Path(path)
    if (path / STATE_FILE).is_file() or (path / MANIFEST_FILE).is_file():
        problem = checkpoint_problem(path, verifier)
        if problem:
            raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
        return path
    pointer = path / LATEST_FILE
    named = None
    if pointer.is_file():
        try:
            named = path / iter_name(int(pointer.read_text().strip()))
        except ValueError:
            report(f"[checkpoint] {pointer} is unreadable ({pointer.read_text()[:40]!r}); ignoring it")
    skipped = []
    for ckpt in checkpoint_dirs(path):
        problem = checkpoint_problem(ckpt, verifier)
        if problem:
            skipped.append(f"{ckpt.name}: {problem}")
            report(f"[checkpoint] skipping {ckpt}: {problem}")
            continue
        if named is None:
            report(f"[checkpoint] {pointer} is missing; using the newest complete checkpoint {ckpt}")
        elif named != ckpt:
            report(f"[checkpoint] {pointer} names {named.name}; using the newest intact checkpoint {ckpt}")
        return ckpt
    if skipped:
        raise CheckpointError(f"no usable checkpoint in {path}: " + "; ".join(skipped))
    raise CheckpointNotFoundError(f"no checkpoint in {path} (neither {STATE_FILE} nor iter_* directories)")


def has_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a checkpoint or a save directory's traces of one (a pointer or ``iter_*``
    directories, intact or not): a run resumes from it, or says why it cannot, but never silently starts fresh."""
    path = Path(path)
    return ((path / STATE_FILE).is_file() or (path / LATEST_FILE).is_file() or (path / MANIFEST_FILE).is_file()
            or bool(checkpoint_dirs(path)))


def is_megatron_checkpoint(path: str | Path) -> bool:
    """An actor checkpoint (or save dir), or ``hf_to_mcore`` output."""
    path = Path(path)
    return has_checkpoint(path) or ((path / "model").is_dir() and (path / "hf_config.json").is_file())
