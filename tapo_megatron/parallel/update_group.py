"""Weight-update process groups between trainer source ranks and rollout engines (disaggregated weight sync).

A weight-update group is a process group OUTSIDE the trainer's torchrun world: rank 0 is one trainer source rank
(TP rank 0, DP rank 0 of one pipeline stage), ranks 1.. are the engines' GPUs (``rank_offset`` per engine). It is
built exactly the way SGLang builds its side (``sglang.srt.utils.init_custom_process_group``, called by the
``/init_weights_update_group`` endpoint): TCP rendezvous at ``tcp://master_address:master_port``, the store prefixed
with the group name, then ``torch.distributed``'s group constructor with the group's own ranks 0..world_size-1.
Both sides must use the same construction, or the rendezvous keys do not meet.

Backend-agnostic: "nccl" between GPU trainers and SGLang, "gloo" between a CPU trainer and a native engine process
(the tests). Only this module touches these groups' construction; callers get a ``ProcessGroup`` and use
``torch.distributed.broadcast(tensor, src=0, group=pg)``.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def init_weight_update_group(
    *,
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    timeout_s: float = 300.0,
) -> dist.ProcessGroup:
    """Join (rank 0: host) a standalone process group of ``world_size`` ranks; blocks until all ranks joined.

    Args:
        master_address, master_port: where rank 0's TCP store listens (rank 0 creates it).
        rank: this process's rank in the group (trainer source: 0; an engine: its ``rank_offset`` + local rank).
        world_size: 1 trainer rank + every engine GPU.
        group_name: unique per group (e.g. ``tapo-pp0``); engines address the group by this name.
        backend: "nccl" or "gloo".

    Returns:
        The group; its ranks are its own 0..world_size-1 (also when this process belongs to another world).
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
    )

    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    timeout = datetime.timedelta(seconds=timeout_s)
    # The TCP store rendezvous of init_method="tcp://..." (what SGLang's side does), built explicitly: under
    # torchrun, TORCHELASTIC_USE_AGENT_STORE makes the generic rendezvous connect to the launcher's store instead
    # of hosting one on rank 0, and both sides would then wait for a server that never starts.
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0), timeout=timeout,
                          multi_tenant=True)
    store = PrefixStore(group_name, store)
    # torch >= 2.6 renamed pg_options to backend_options (SGLang switches the same way).
    options_name = "backend_options" if _torch_at_least(2, 6) else "pg_options"
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout,
        **{options_name: None})
    # Group rank i == "global" rank i for this group, so dist.broadcast(src=0, group=...) means the trainer rank.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_weight_update_group(group: dist.ProcessGroup) -> None:
    """Tear the group down (both sides call it; an already-destroyed group is ignored)."""
    try:
        dist.destroy_process_group(group)
    except (ValueError, RuntimeError, KeyError):
        pass


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)
