"""The device and parallel layer: the one place that knows CPU from GPU and touches process groups.

``init_parallel`` initialises torch.distributed (NCCL on GPU, gloo on CPU; under torchrun or as a single process),
Megatron's parallel state (TP x PP x DP) and the model-parallel RNG, and returns a ``ParallelContext`` that the rest
of the code receives explicitly. On CPU it first installs the Megatron compatibility layer (``cpu_compat``).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from tapo_megatron.errors import ConfigError

import torch
import torch.distributed as dist


class ParallelConfigError(ConfigError):
    """A parallel layout that cannot work (raised before anything is built)."""


@dataclass
class ParallelContext:
    device: torch.device
    backend: str  # "nccl" or "gloo"
    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup  # TP x PP: ranks holding one full model replica

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def last_stage_global_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_last_rank()


def device() -> torch.device:
    """The compute device of this process."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_gpu() -> bool:
    return torch.cuda.is_available()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_layout(world_size: int, tp: int, pp: int, num_layers: int | None = None,
                 num_heads: int | None = None, num_kv_heads: int | None = None, vocab_size: int | None = None) -> int:
    """Validate a TP x PP layout against the world size and model shape; return the DP size."""
    if tp < 1 or pp < 1:
        raise ParallelConfigError(f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} must be >= 1")
    if world_size % (tp * pp):
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size x pipeline_model_parallel_size "
            f"= {tp} x {pp}")
    if num_heads is not None and num_heads % tp:
        raise ParallelConfigError(
            f"tensor_model_parallel_size={tp} does not divide num_attention_heads={num_heads}")
    if num_kv_heads is not None and num_kv_heads % tp:
        raise ParallelConfigError(
            f"tensor_model_parallel_size={tp} does not divide num_key_value_heads={num_kv_heads}")
    if num_layers is not None and num_layers % pp:
        raise ParallelConfigError(
            f"pipeline_model_parallel_size={pp} does not divide num_hidden_layers={num_layers}")
    if vocab_size is not None and vocab_size % tp:
        raise ParallelConfigError(f"tensor_model_parallel_size={tp} does not divide vocab_size={vocab_size}")
    return world_size // (tp * pp)


def launched_world_size() -> int | None:
    """The world size torchrun (or Slurm via torchrun) launched this process into; None for a plain process."""
    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None


def setup_parallel(tp: int, pp: int, seed: int, **model_dims: int) -> ParallelContext:
    """Check the layout against the launch and the model (``num_layers``, ``num_heads``, ``num_kv_heads``,
    ``vocab_size``: ``Qwen3Shape.layout_dims()``), then initialise it. Refusing a layout the model cannot be split
    into here names the field; Megatron would raise from deep inside."""
    world = launched_world_size()
    check_layout(world if world is not None else tp * pp, tp, pp, **model_dims)
    return init_parallel(tp, pp, seed=seed)


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_minutes: int = 30) -> ParallelContext:
    """Initialise torch.distributed + Megatron parallel state; idempotent for the same layout.

    Under torchrun the env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is used; otherwise a single-process group
    on a free local port is created, so the same code runs as a plain ``python`` process.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    gpu = is_gpu()
    if not gpu:
        from tapo_megatron.parallel import cpu_compat

        cpu_compat.install()
    backend = "nccl" if gpu else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun / Slurm: rendezvous from the environment
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # A plain process: a 1-rank group. Not written into os.environ, so child processes (torchrun workers,
            # engine servers) do not inherit a RANK / MASTER_PORT that this process's store already holds.
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                    world_size=1, timeout=timeout)
    world = dist.get_world_size()
    check_layout(world, tp, pp)
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed + ps.get_pipeline_model_parallel_rank() * 100)
    return ParallelContext(
        device=device(), backend=backend, world_size=world, rank=dist.get_rank(),
        tp_size=tp, pp_size=pp, dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(), mp_group=ps.get_model_parallel_group(),
    )


def broadcast_object(obj, ctx: ParallelContext):
    """``obj`` from global rank 0 to every rank (pickled); a no-op in a single process."""
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, ctx: ParallelContext) -> bool:
    """True on every rank when ``flag`` is True on any rank (collective; ranks agreeing to skip or stop a step)."""
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
