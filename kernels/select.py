"""Which implementation runs: Triton kernels on CUDA, the torch implementations on CPU, with a switch to force either.

Resolution order for ``backend="auto"``: the ``TAPO_KERNELS`` environment variable (``torch`` or ``triton``) if set,
else ``triton`` when the tensors are on a CUDA device (and triton imports), else ``torch``.
An explicit ``backend="triton"`` / ``"torch"`` argument always wins over the environment.

Triton on CPU tensors only works under the interpreter (``TRITON_INTERPRET=1``, ~3,000x slower than torch: tests only).
Nothing here imports triton or launches anything at import time, so ``import tapo_kernels`` works without a GPU.
"""
from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
ENV_VAR = "TAPO_KERNELS"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` works (it may still have no active driver on a CPU-only machine)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_interpreter_ready() -> bool:
    """True when triton's own library functions (``tl.sum``, ``tl.max``...) were built for the interpreter.

    Triton decides interpreter vs compiler for its standard library when ``triton`` is first imported, so
    ``TRITON_INTERPRET=1`` must be in the environment before anything (megatron.core, inductor...) imports triton.
    """
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


def _check_backend_name(backend: str, origin: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r} from {origin}; valid: {', '.join(BACKENDS)}")


def resolve_backend(backend: str, device: torch.device) -> Literal["triton", "torch"]:
    """The concrete backend for tensors on ``device``; raises if ``triton`` is forced where it cannot run."""
    _check_backend_name(backend, "the backend argument")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            _check_backend_name(env, f"${ENV_VAR}")
            backend = env
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"kernel backend 'triton' requested for tensors on {device}: triton runs on CUDA, or on CPU only "
                "with TRITON_INTERPRET=1 (tests); use backend='torch' or TAPO_KERNELS=torch"
            )
        if device.type != "cuda" and not triton_interpreter_ready():
            raise RuntimeError(
                "TRITON_INTERPRET=1 is set but triton was imported before it was: set it before the first "
                "`import triton` (e.g. before importing megatron.core), or run in a fresh process"
            )
    return backend  # type: ignore[return-value]
