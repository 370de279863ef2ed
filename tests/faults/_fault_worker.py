"""Worker for the fault-injection suite: runs the ``tapo`` CLI with one fault injected, exits with its exit code.

    python tests/faults/_fault_worker.py FAULT[:N] tapo-args...

FAULT (N is the step or the checkpoint iteration it strikes at):
    none           no fault
    kill_step:N    SIGKILL right after step N is logged, before its checkpoint (kill -9 mid-step)
    kill_save:N    SIGKILL while checkpoint N is being published: written to iter_N.tmp, not yet renamed
    enospc_save:N  every shard write of checkpoint N fails with ENOSPC (disk full), as the OS reports it
    term_step:N    SIGTERM to itself during step N (as Slurm preemption sends it); the handler runs for real
    nan_grad_step:N  the gradient of step N is NaN while its loss is finite

Injections patch the narrowest point: the logger call, ``publish_checkpoint``, Megatron's ``_write_item`` (the
function its async filesystem writer calls per item, megatron/core/dist_checkpointing/strategies/
filesystem_async.py, 0.19.2), and the loss function handed to ``train_step``.
"""
import errno
import functools
import os
import signal
import sys

import torch


def install(fault: str) -> None:
    name, _, arg = fault.partition(":")
    n = int(arg) if arg else 0
    if name == "none":
        return
    if name in ("kill_step", "term_step"):
        from tapo_megatron.logging.tracker import MetricsLogger

        log = MetricsLogger.log
        sig = signal.SIGKILL if name == "kill_step" else signal.SIGTERM

        def log_then_signal(self, step, metrics):
            if name == "term_step" and step == n:
                os.kill(os.getpid(), sig)  # during step n: it still logs, saves and then stops
            log(self, step, metrics)
            if name == "kill_step" and step == n:
                os.kill(os.getpid(), sig)

        MetricsLogger.log = log_then_signal
    elif name == "kill_save":
        import tapo_megatron.training.actor as actor_mod

        publish = actor_mod.publish_checkpoint

        def publish_or_die(tmp, final, iteration, keep_last=0):
            if iteration == n:
                os.kill(os.getpid(), signal.SIGKILL)
            publish(tmp, final, iteration, keep_last)

        actor_mod.publish_checkpoint = publish_or_die
    elif name == "enospc_save":
        import megatron.core.dist_checkpointing.strategies.filesystem_async as fs_async

        from tapo_megatron.training.actor import MegatronActor

        write_item = fs_async._write_item
        save = MegatronActor.save_checkpoint
        saving = {"iteration": -1}

        def save_tracked(self, *args, **kwargs):
            saving["iteration"] = self.iteration
            return save(self, *args, **kwargs)

        @functools.wraps(write_item)  # keeps the signature Megatron inspects for serialization_format
        def write_or_fail(*args, **kwargs):
            if saving["iteration"] == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(args[1], "name", "?"))
            return write_item(*args, **kwargs)

        MegatronActor.save_checkpoint = save_tracked
        fs_async._write_item = write_or_fail
    elif name == "nan_grad_step":
        from tapo_megatron.training.actor import MegatronActor

        train_step = MegatronActor.train_step

        def nan_grad_step(self, tensors, loss_fn):
            if self.iteration + 1 != n:
                return train_step(self, tensors, loss_fn)

            def nan_grad_loss(logprobs, mb):  # the forward (and so the loss) stays finite
                poisoned = logprobs.clone()
                poisoned.register_hook(lambda g: g * float("nan"))
                return loss_fn(poisoned, mb)

            return train_step(self, tensors, nan_grad_loss)

        MegatronActor.train_step = nan_grad_step
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    install(sys.argv[1])
    from tapo_megatron.commands import main

    sys.exit(main(sys.argv[2:]))
