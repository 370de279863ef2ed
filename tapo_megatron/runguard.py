"""What every training run (``tapo train``, ``tapo sft``) holds while it runs: a lock on its directories, a clean
save directory, and preemption signals turned into "finish this step, checkpoint, exit ``PREEMPTED_EXIT_CODE``".

    guard = RunGuard.start(cfg)              # before any model is built; rank 0 locks, every rank gets the handlers
    for step in ...:
        ...one step..., save on the interval
        if guard.stop_requested(ctx):        # every rank agrees (one tiny all-reduce)
            break                            # the loop's final save follows
    guard.close()

Lock: ``<dir>/.tapo-run.lock`` in ``logging.output_dir`` and ``checkpoint.save`` holds ``{pid, host, started}``; a
second run there is refused with the holder's pid and host. A lock whose pid is dead on this host (a run killed
with -9) is taken over, saying so. Signals: SIGTERM (Slurm preemption / ``scancel``), SIGUSR1 (Slurm's
``--signal`` warning before the time limit) and SIGINT (Ctrl-C) ask for a stop at the end of the current step; a
second SIGINT interrupts at once. The process then exits ``PREEMPTED_EXIT_CODE`` (75, EX_TEMPFAIL: "run me
again"), so a launcher can tell a preempted run, which resumes from its checkpoint, from a finished (0) or failed
(1, 2) one.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from tapo_megatron.convert.checkpoints import remove_stale_tmp
from tapo_megatron.errors import TapoError

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; run again to resume
LOCK_FILE = ".tapo-run.lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class RunLockedError(TapoError):
    """Another live run holds the output or checkpoint directory."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # no pid recorded (os.kill(-1, 0) would ask about every process)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # before torch.distributed exists: torchrun's env


class DirLock:
    """``<directory>/.tapo-run.lock``, created exclusively; see the module docstring."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released (or half-written) meanwhile: try again
                if holder.get("host") != me["host"] or (holder.get("pid") != me["pid"]
                                                        and _pid_alive(int(holder.get("pid", -1)))):
                    raise RunLockedError(
                        f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on host "
                        f"{holder.get('host')}, since {holder.get('started', '?')}); wait for it to end, or use "
                        f"another logging.output_dir / checkpoint.save (if that run is dead on another host, remove "
                        f"{self.path})") from None
                if holder.get("pid") != me["pid"]:  # else: this process's own, from an earlier run that raised
                    print(f"[run] taking over the stale lock {self.path} of pid {holder.get('pid')} (no longer "
                          "running)", flush=True)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunLockedError(f"could not take the lock {self.path}: another run keeps taking it")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # written by a process killed between create and write: nobody holds it
            return {"pid": -1, "host": socket.gethostname()}

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


class RunGuard:
    def __init__(self, locks: list[DirLock]):
        self.locks = locks
        self.stop_signal: str = ""  # the name of the signal that asked for a stop, "" if none
        self._previous: dict = {}

    @classmethod
    def start(cls, cfg) -> "RunGuard":
        """Lock ``logging.output_dir`` and ``checkpoint.save`` (rank 0), remove stale ``.tmp`` saves, install the
        stop handlers. Raises RunLockedError before any expensive work when another run holds a directory."""
        dirs = {Path(d).resolve() for d in (cfg.logging.output_dir, cfg.checkpoint.save) if d}
        guard = cls([DirLock(d) for d in sorted(dirs)] if _is_main_process() else [])
        for lock in guard.locks:
            try:
                lock.acquire()
            except BaseException:
                guard.release()
                raise
        atexit.register(guard.release)
        if cfg.checkpoint.save and _is_main_process():
            for path in remove_stale_tmp(cfg.checkpoint.save):
                print(f"[checkpoint] removed {path}, left by an interrupted save", flush=True)
        guard._install()
        return guard

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. a run inside a test thread)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.stop_signal:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_signal = self.stop_signal or name
        print(f"[run] {name} received: finishing this step, then saving a checkpoint and exiting "
              f"{PREEMPTED_EXIT_CODE}", flush=True)

    def stop_requested(self, ctx=None) -> bool:
        """Whether a stop signal arrived on any rank (collective under torch.distributed: call on every rank)."""
        flag = bool(self.stop_signal)
        if ctx is not None and ctx.world_size > 1:
            from tapo_megatron.parallel import any_rank

            flag = any_rank(flag, ctx)
            self.stop_signal = self.stop_signal or ("a signal to another rank" if flag else "")
        return flag

    @property
    def preempted(self) -> bool:
        return bool(self.stop_signal)

    def release(self) -> None:
        for lock in self.locks:
            lock.release()

    def close(self) -> None:
        """Restore the previous signal handlers and release the locks."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        self.release()
