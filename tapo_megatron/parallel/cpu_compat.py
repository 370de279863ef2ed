"""Make Megatron-Core run on CPU (gloo), so tests, CI and the embedded demo use the same code path as H100 runs.

Megatron-Core assumes CUDA throughout. On a machine without CUDA, ``install()`` (called once by
``tapo_megatron.parallel.init_parallel`` before any model is built) applies the compatibility layer that
was measured to be sufficient (megatron-core 0.19.2, torch 2.13 CPU):

* ``torch.cuda.current_device`` and every ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")`` inside Megatron resolve
  to the CPU: a global ``TorchFunctionMode`` rewrites CUDA device arguments (about 200 call sites in megatron.core).
* The model-parallel CUDA RNG tracker runs on the CPU generator (``torch.cuda.{get,set}_rng_state``,
  ``manual_seed`` and Megatron's private ``_set_cuda_rng_state``).
* ``Tensor.type()`` reports ``torch.cuda.*Tensor``: the DistributedOptimizer and grad clipping check it.
* ``torch.cuda.Stream/Event/current_stream/synchronize/...`` become no-ops (DDP grad sync, checkpoint writer).
* dist-checkpointing's async writer starts a spawn-context ``multiprocessing.Manager`` on first save (4-10 s); a
  plain ``queue.Queue`` makes synchronous saves take milliseconds.

Nothing here is applied when CUDA is available. Nothing outside ``tapo_megatron.parallel`` imports this module.
"""
from __future__ import annotations

import contextlib
import queue
import re

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_CUDA_DEVICE = re.compile(r"^cuda(:\d+)?$")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return bool(_CUDA_DEVICE.match(device))
    # A bare int means a CUDA ordinal; there is none on this machine.
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made while the mode is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE.get(name, name)
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event on CPU: ordering is already sequential."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def install() -> None:
    """Apply the CPU compatibility layer (idempotent; no-op when CUDA is available)."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.device_count = lambda: 1
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_stats = lambda device=None: {}
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda device=None: _NoOpStream()
    cuda.default_stream = lambda device=None: _NoOpStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_stream = lambda stream: None
    # RNG: Megatron's tracker swaps "CUDA" generator states; on CPU the CPU generator is the one that samples.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which must stay the lazy no-op it is on CPU.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._set_cuda_rng_state = _set_cpu_rng_state

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _results = queue.Queue()
    filesystem_async.get_write_results_queue = lambda mp_mode="spawn": _results

    # Entered for the life of the process: Megatron creates CUDA tensors at unpredictable times (schedules,
    # optimizer, checkpoint exchange), and the mode only rewrites CUDA devices, which cannot occur on CPU anyway.
    _CudaToCpuMode().__enter__()
    _INSTALLED = True
