"""A process pool that scores ``(response, gold)`` pairs with a hard per-item deadline.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one stuck task. Symbolic verification can hang
(sympy simplifying a pathological expression), and math_verify's own timeout uses ``signal.alarm``, which raises
outside the main thread. Here every worker owns a pipe and runs one item at a time; the parent waits on the pipes
with a deadline, and a worker past its deadline is SIGKILLed and replaced, its item scoring 0.0.

Inputs: a picklable top-level ``worker_fn(response: str, gold: str) -> float`` (injectable, so tests can hang a
worker on purpose) and lists of strings. Output: one float per pair, in input order. Bad text never raises: an
exception in ``worker_fn``, a non-finite score, a crashed or hung worker all give 0.0 and are counted in ``stats``.

    with VerificationPool(my_fn, num_workers=2, timeout_s=5.0) as pool:
        scores = pool.score_batch(responses, golds)
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

WorkerFn = Callable[[str, str], float]  # (response, gold) -> score; must be picklable (a module-level function)


@dataclass
class PoolStats:
    """Counters over the pool's lifetime (log them as rates per step)."""

    num_items: int = 0  # pairs submitted, including those skipped as non-str
    num_timeouts: int = 0  # items whose worker ran past the deadline (killed, scored 0.0)
    num_crashes: int = 0  # items whose worker died without answering (scored 0.0)
    num_errors: int = 0  # items where worker_fn raised or returned a non-finite value (scored 0.0)
    num_restarts: int = 0  # workers started to replace killed or dead ones
    num_abandoned: int = 0  # items left unscored (0.0) when a batch reached its deadline (batch_timeout_s)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started_at: float  # time.monotonic() when the process was started
    ready: bool = False  # the worker has imported everything and said so; only ready workers get items
    item: int | None = None  # index into the current batch, None when idle
    deadline: float = 0.0  # time.monotonic() after which the item is abandoned


def _worker_main(conn: multiprocessing.connection.Connection, payload: bytes, parent_sys_path: list[str]) -> None:
    """Worker loop: send ``None`` once ready, then receive ``(item, response, gold)`` and send back
    ``(item, score, ok)``; a ``None`` message stops it."""
    # Ctrl-C goes to the whole process group, and Slurm's SIGTERM / SIGUSR1 to every process of the job: the parent
    # decides when workers die (it finishes the step's rewards before stopping), so a preemption signal cannot
    # turn the last step's rewards into crashes scored 0.0. A worker still dies with its parent (PDEATHSIG).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()
    # worker_fn travels pickled by reference; unpickle it with the parent's sys.path, since a forkserver started
    # earlier by someone else may not have it (e.g. a plug-in or test module found through a path added later).
    sys.path[:] = parent_sys_path + [p for p in sys.path if p not in parent_sys_path]
    worker_fn, initializer = pickle.loads(payload)
    if initializer is not None:
        initializer()
    # Imports (sympy, worker_fn's module) are done by now: the parent starts item deadlines only after this.
    conn.send(None)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if message is None:
            return
        item, response, gold = message
        try:
            score = float(worker_fn(response, gold))
            ok = math.isfinite(score)
        except Exception:  # bad text must not kill the worker
            score, ok = 0.0, False
        conn.send((item, score if ok else 0.0, ok))


@contextmanager
def _main_module_hidden():
    """Start a worker without re-running the caller's script: a new process imports ``__main__`` from its
    ``__spec__`` / ``__file__`` (multiprocessing.spawn.get_preparation_data), which re-runs a script that has no
    ``if __name__ == "__main__":`` guard (and fails for a script read from stdin). Workers whose functions live in
    real modules do not need it."""
    main = sys.modules.get("__main__")
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if main and name in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)
            if "__spec__" not in saved:
                main.__dict__.pop("__spec__", None)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (the forkserver, which exits with the trainer)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _stop_workers(workers: list[_Worker]) -> None:
    """Kill and reap every worker (used by close() and at garbage collection / interpreter exit)."""
    for worker in workers:
        _kill(worker)


def _kill(worker: _Worker) -> None:
    try:
        worker.conn.close()
    except OSError:
        pass
    if worker.process.is_alive():
        worker.process.kill()
    worker.process.join(timeout=5.0)


class VerificationPool:
    """``num_workers`` processes running ``worker_fn`` with a deadline of ``timeout_s`` seconds per item.

    Args:
        worker_fn: module-level ``(response, gold) -> float``; it is pickled by reference into the workers.
        num_workers: worker processes; default ``min(4, os.cpu_count())``.
        timeout_s: wall-clock limit per item, counted from when a worker receives it.
        start_method: ``"forkserver"`` (default: workers fork from a small single-threaded server, so a
            multi-threaded trainer is never forked and a replacement starts in milliseconds), ``"spawn"`` or
            ``"fork"``.
        initializer: optional module-level function each worker runs once before its first item.
        preload: modules the forkserver imports once, so that replacements start warm.
        startup_timeout_s: how long a new worker may take to import its modules before the pool gives up
            (RuntimeError). Item deadlines start only once a worker is ready, so a slow start is never a timeout.
        batch_timeout_s: wall-clock limit of one ``score_batch`` call (the training step's deadline), None for
            none. Past it, items still queued or running score 0.0 (``stats.num_abandoned``) and busy workers are
            replaced, so a batch full of hanging responses costs this long, not ``len / num_workers`` timeouts.

    Thread-safe: calls are serialised by a lock. ``close()`` (or leaving the ``with`` block) stops the workers.
    """

    def __init__(
        self,
        worker_fn: WorkerFn,
        *,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        start_method: str = "forkserver",
        initializer: Callable[[], None] | None = None,
        preload: Sequence[str] = (),
        startup_timeout_s: float = 120.0,
        batch_timeout_s: float | None = None,
    ) -> None:
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method {start_method!r} is not available here; choose from "
                f"{multiprocessing.get_all_start_methods()}"
            )
        try:
            # Pickled once here so a lambda or closure fails now, not inside every worker.
            self._payload = pickle.dumps((worker_fn, initializer))
        except Exception as exc:
            raise TypeError(
                f"worker_fn {worker_fn!r} and initializer {initializer!r} must be picklable module-level functions: "
                f"{exc}"
            ) from exc
        self.worker_fn = worker_fn
        self._needs_main = any(getattr(f, "__module__", None) == "__main__" for f in (worker_fn, initializer) if f)
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        if batch_timeout_s is not None and not batch_timeout_s > 0:
            raise ValueError(f"batch_timeout_s must be > 0 or None, got {batch_timeout_s}")
        self.batch_timeout_s = batch_timeout_s
        self.stats = PoolStats()
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver" and preload:
            # Only takes effect if this process has not started its forkserver yet.
            self._ctx.set_forkserver_preload(list(preload))
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        # Reap workers even if close() is never called; holds the list, not self.
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    # -- public API ---------------------------------------------------------------------------------------------

    def score(self, response: str, gold: str) -> float:
        """Score one pair within ``timeout_s``; 0.0 on timeout, crash, error or non-str input."""
        return self.score_batch([response], [gold])[0]

    __call__ = score

    def score_batch(self, responses: Sequence[str], golds: Sequence[str]) -> list[float]:
        """Score ``responses[i]`` against ``golds[i]`` for all i through the pool; returns floats in input order.

        Each item gets its own ``timeout_s`` from the moment a worker picks it up, so a batch takes about
        ``len / num_workers`` item-times plus at most ``timeout_s`` per hung item. Pairs where either side is not
        a ``str`` (e.g. None for an aborted rollout) score 0.0 without being sent.

        Raises:
            ValueError: ``responses`` and ``golds`` differ in length.
            RuntimeError: the pool is closed, or a worker process could not be started.
        """
        if len(responses) != len(golds):
            raise ValueError(f"responses has {len(responses)} items but golds has {len(golds)}")
        with self._lock:
            if self._closed:
                raise RuntimeError("VerificationPool is closed")
            self.stats.num_items += len(responses)
            results = [0.0] * len(responses)
            pending = deque(
                i for i in range(len(responses)) if isinstance(responses[i], str) and isinstance(golds[i], str)
            )
            try:
                return self._run(pending, responses, golds, results)
            except BaseException:
                # Interrupted (Ctrl-C, startup failure): abandon in-flight items so the next call starts clean.
                for worker in self._workers:
                    if worker.item is not None:
                        worker.item = None
                        try:
                            self._replace(worker)
                        except Exception:
                            pass  # the original error is the one to report
                raise

    def close(self) -> None:
        """Stop all workers. Idempotent; later calls to score/score_batch raise RuntimeError."""
        with self._lock:
            self._closed = True
            for worker in self._workers:
                try:
                    worker.conn.send(None)  # ask idle workers to exit on their own
                except OSError:
                    pass
            for worker in self._workers:
                worker.process.join(timeout=1.0)
            self._finalizer()  # kills whatever is still running

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> VerificationPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------------

    def _run(
        self, pending: deque[int], responses: Sequence[str], golds: Sequence[str], results: list[float]
    ) -> list[float]:
        """Feed ``pending`` items to ready workers until all are answered, timed out, crashed or abandoned at the
        batch deadline."""
        batch_deadline = math.inf  # starts with the first item sent: worker start-up is not the batch's time
        while True:
            if time.monotonic() >= batch_deadline:
                self._abandon(pending)
                return results
            for worker in self._workers:
                if worker.ready and worker.item is None and pending:
                    self._dispatch(worker, pending, responses, golds)
                    if self.batch_timeout_s and batch_deadline == math.inf:
                        batch_deadline = time.monotonic() + self.batch_timeout_s
            busy = [w for w in self._workers if w.item is not None]
            starting = [w for w in self._workers if not w.ready]
            if not busy and not pending:
                return results
            deadlines = [w.deadline for w in busy] + [w.started_at + self.startup_timeout_s for w in starting]
            deadlines.append(batch_deadline)
            wait_s = max(0.0, min(deadlines) - time.monotonic())
            ready = multiprocessing.connection.wait([w.conn for w in busy + starting], timeout=wait_s)
            for worker in starting:
                if worker.conn in ready:
                    self._handshake(worker)
                elif time.monotonic() >= worker.started_at + self.startup_timeout_s:
                    raise RuntimeError(
                        f"verification worker pid {worker.process.pid} did not become ready within "
                        f"{self.startup_timeout_s:.0f} s"
                    )
            for worker in busy:
                if worker.conn in ready:
                    self._collect(worker, results)
                elif time.monotonic() >= worker.deadline:
                    logger.warning(
                        "verification of item %d exceeded %.1f s; killing worker pid %s",
                        worker.item, self.timeout_s, worker.process.pid,
                    )
                    self.stats.num_timeouts += 1
                    results[worker.item] = 0.0
                    self._replace(worker)

    def _abandon(self, pending: deque[int]) -> None:
        """The batch deadline passed: queued and running items keep their 0.0; running workers are replaced."""
        busy = [w for w in self._workers if w.item is not None]
        self.stats.num_abandoned += len(pending) + len(busy)
        logger.warning("verification batch reached its %.1f s deadline: %d item(s) left unscored (0.0)",
                       self.batch_timeout_s, len(pending) + len(busy))
        pending.clear()
        for worker in busy:
            worker.item = None
            self._replace(worker)

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._payload, list(sys.path)),
            name="reward-verifier",
            daemon=True,  # never outlive the trainer
        )
        try:
            with nullcontext() if self._needs_main else _main_module_hidden():
                process.start()
        except Exception as exc:
            parent_conn.close()
            method = self._ctx.get_start_method()
            raise RuntimeError(f"could not start a verification worker ({method}): {exc}") from exc
        finally:
            child_conn.close()  # the child holds its own copy
        return _Worker(process=process, conn=parent_conn, started_at=time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker``'s process and put a fresh one in the same slot (the slot object is kept)."""
        _kill(worker)
        fresh = self._start_worker()
        worker.process, worker.conn, worker.started_at = fresh.process, fresh.conn, fresh.started_at
        worker.ready, worker.item, worker.deadline = False, None, 0.0
        self.stats.num_restarts += 1

    def _handshake(self, worker: _Worker) -> None:
        """Read a starting worker's ready message; a worker that died while starting is a setup error."""
        try:
            worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=5.0)
            raise RuntimeError(
                f"verification worker pid {worker.process.pid} exited during startup (exit code "
                f"{worker.process.exitcode}); check that worker_fn {self.worker_fn!r} and its module import in a "
                "fresh process" + ("; worker_fn is defined in the main script: put it in an importable module, or "
                                   "guard the script's top level with `if __name__ == \"__main__\":`"
                                   if self._needs_main else "")
            ) from None
        worker.ready = True

    def _dispatch(self, worker: _Worker, pending: deque[int], responses: Sequence[str], golds: Sequence[str]) -> None:
        """Send the next pending item to an idle ready ``worker`` and start its deadline."""
        if not worker.process.is_alive():  # died while idle (e.g. OOM-killed): restart, do not charge an item
            self._replace(worker)
            return
        item = pending[0]
        try:
            worker.conn.send((item, responses[item], golds[item]))
        except OSError:
            self._replace(worker)
            return
        pending.popleft()
        worker.item = item
        worker.deadline = time.monotonic() + self.timeout_s

    def _collect(self, worker: _Worker, results: list[float]) -> None:
        try:
            item, score, ok = worker.conn.recv()
        except (EOFError, OSError):
            logger.warning("verification worker pid %s died on item %d", worker.process.pid, worker.item)
            self.stats.num_crashes += 1
            results[worker.item] = 0.0
            self._replace(worker)
            return
        if item != worker.item:  # cannot happen with one item in flight per worker; guard against silent mixups
            raise RuntimeError(f"verification worker answered item {item} while item {worker.item} was in flight")
        if not ok:
            self.stats.num_errors += 1
        results[item] = score
        worker.item = None
