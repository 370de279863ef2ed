"""SGLang rollout engines behind the ``RolloutEngine`` interface: launch or connect, generate, restart, update.

One ``SGLangEngine`` drives one or more SGLang HTTP servers (one per node or per engine-TP group):

    SGLangEngine.launch([ServerLaunch(argv=sglang_server_argv(model, tp=2, ...)), ...])   # subprocesses
    SGLangEngine.connect(["http://10.0.0.5:30000", ...])                                  # running servers
    engine.generate(prompts, params)   # shards prompts over healthy servers, one batch request per server

Per server (``EngineServer``): a subprocess on a free port with its log captured to a file, a health wait with a
deadline, clean shutdown (SIGTERM to the process group, SIGKILL after a grace period).

Failure handling in ``generate``: a shard whose request fails (connection refused/reset, time-out, HTTP 5xx, the
process exited) marks its server dead; a launched server is restarted (same argv, new port if needed) and the whole
shard is retried under fresh request ids. A shard's results are accepted only from one complete response, and each
prompt slot is filled exactly once, so no prompt is lost or returned twice (``EngineStats`` counts restarts and
retried prompts). A restarted server comes back with its launch weights: when the engine knows a checkpoint of the
current version (``reload_path``, set by the disk transport) it reloads it; otherwise its generations are tagged with
the version it reports, and the next weight sync brings it up to date.

The request payloads are built by the ``*_payload`` functions below, which ``tests/test_sglang_contract.py`` checks
against SGLang's own request dataclasses (``sglang.srt.managers.io_struct``) and server-argument parser; nothing here
imports sglang (the trainer environment need not have it), except the colocated CUDA-IPC path, which runs where
SGLang does.

``tapo_megatron.rollout.remote`` serves a native engine with the same protocol; the CPU tests drive it with this class.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tapo_megatron.records import FinishReason, Generation, SamplingParams
from tapo_megatron.rollout.base import RolloutEngine, check_sampling_params

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """An engine server that cannot serve: failed to start, died, or refused a request (message names the URL)."""


class EngineUnavailable(EngineError):
    """A request could not reach a live server (connection refused/reset, time-out, process gone): retryable."""


# ---------------------------------------------------------------------------------------------- request payloads
# Every body the adapter sends, in one place, so the contract test can build SGLang's request classes from them.


def sampling_payload(params: SamplingParams, seed: int | None = None) -> dict[str, Any]:
    """SGLang ``sampling_params`` for one prompt. ``no_stop_trim`` keeps a matched stop token in the output ids,
    as the ``RolloutEngine`` contract requires; ``skip_special_tokens`` only affects the (unused) text."""
    out: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p,
                           "max_new_tokens": params.max_new_tokens, "no_stop_trim": True}
    if params.stop_token_ids:
        out["stop_token_ids"] = sorted(set(params.stop_token_ids))
    if seed is not None:
        out["sampling_seed"] = seed
    return out


def generate_payload(prompts: Sequence[Sequence[int]], params: SamplingParams, rids: Sequence[str],
                     seeds: Sequence[int | None] | None = None, prompt_logprobs: bool = False) -> dict[str, Any]:
    """A batch ``/generate`` body (GenerateReqInput) from token ids, asking for per-token log-probs.

    ``prompt_logprobs=True`` also returns ``input_token_logprobs`` from position 0 (the post-sync probe check).
    """
    seeds = list(seeds) if seeds is not None else [None] * len(prompts)
    return {
        "input_ids": [list(map(int, p)) for p in prompts],
        "sampling_params": [sampling_payload(params, s) for s in seeds],
        "rid": list(rids),
        "return_logprob": True,
        "logprob_start_len": 0 if prompt_logprobs else -1,
        "return_text_in_logprobs": False,
        "stream": False,
    }


def init_group_payload(master_address: str, master_port: int, rank_offset: int, world_size: int,
                       group_name: str, backend: str) -> dict[str, Any]:
    """``/init_weights_update_group`` body (InitWeightsUpdateGroupReqInput)."""
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def update_distributed_payload(bucket: Sequence[tuple[str, torch.Tensor]], group_name: str,
                               weight_version: int | None = None) -> dict[str, Any]:
    """``/update_weights_from_distributed`` body (UpdateWeightsFromDistributedReqInput): announces one bucket whose
    tensors group rank 0 then broadcasts in this order. ``flush_cache`` only with the version-carrying last one."""
    return {
        "names": [name for name, _ in bucket],
        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
        "group_name": group_name,
        "flush_cache": weight_version is not None,
        "abort_all_requests": False,
        "weight_version": None if weight_version is None else str(weight_version),
    }


def update_tensor_payload(serialized_per_rank: Sequence[str], weight_version: int | None,
                          load_format: str | None = "flattened_bucket") -> dict[str, Any]:
    """``/update_weights_from_tensor`` body (UpdateWeightsFromTensorReqInput): one base64 serialized payload per
    engine TP rank (each rank opens the same CUDA IPC handles and keeps its shard)."""
    return {"serialized_named_tensors": list(serialized_per_rank), "load_format": load_format,
            "flush_cache": weight_version is not None, "abort_all_requests": False,
            "weight_version": None if weight_version is None else str(weight_version)}


def update_disk_payload(model_path: str, weight_version: int) -> dict[str, Any]:
    """``/update_weights_from_disk`` body (UpdateWeightFromDiskReqInput)."""
    return {"model_path": str(model_path), "weight_version": str(weight_version), "flush_cache": True,
            "abort_all_requests": False}


def weight_version_payload(version: int) -> dict[str, Any]:
    """``/update_weight_version`` body (UpdateWeightVersionReqInput): the commit of a distributed sync."""
    return {"new_version": str(version), "abort_all_requests": False}


def pause_payload() -> dict[str, Any]:
    """``/pause_generation`` body: abort anything in flight (the adapter retries it), so no rollout mixes versions."""
    return {"mode": "abort"}


def abort_payload(rid: str) -> dict[str, Any]:
    """``/abort_request`` body (AbortReq) for one request id."""
    return {"rid": rid}


def memory_payload(tags: Sequence[str] | None = None) -> dict[str, Any]:
    """``/release_memory_occupation`` and ``/resume_memory_occupation`` body; None: weights and KV cache."""
    return {"tags": list(tags) if tags is not None else None}


def weights_by_name_payload(name: str, truncate_size: int) -> dict[str, Any]:
    """``/get_weights_by_name`` body (GetWeightsByNameReqInput)."""
    return {"name": name, "truncate_size": int(truncate_size)}


def sglang_server_argv(model_path: str, *, tp_size: int = 1, mem_fraction_static: float | None = None,
                       enable_memory_saver: bool = False, random_seed: int | None = None,
                       extra: dict[str, Any] | None = None, python: str = sys.executable) -> list[str]:
    """``python -m sglang.launch_server`` argv with ``{host}``/``{port}`` placeholders (filled at launch).

    ``enable_memory_saver`` is needed for release/resume of memory when engines share the training GPUs.
    ``extra``: further server args, ``{"context-length": 4096, "disable-radix-cache": True}`` -> flags.
    """
    argv = [python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", "{host}",
            "--port", "{port}", "--tp-size", str(tp_size), "--skip-server-warmup"]
    if mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(mem_fraction_static)]
    if enable_memory_saver:
        argv += ["--enable-memory-saver"]
    if random_seed is not None:
        argv += ["--random-seed", str(random_seed)]
    for key, value in (extra or {}).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def native_server_argv(model_path: str, *, python: str = sys.executable, extra: Sequence[str] = ()) -> list[str]:
    """argv of the native engine server (``rollout.remote``) with the same placeholders (CPU tests, no SGLang)."""
    return [python, "-m", "tapo_megatron.rollout.remote", "--model-path", str(model_path), "--host", "{host}",
            "--port", "{port}", *extra]


# ---------------------------------------------------------------------------------------------- one server


@dataclass
class ServerLaunch:
    """How to start one server: argv with ``{host}``/``{port}`` placeholders, its environment additions, and where
    its log goes (default: a file in a temporary directory)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int | None = None  # None: pick a free port at every (re)start
    log_dir: str | None = None
    world_size: int = 1  # GPUs of this server in a weight-update group (its SGLang --tp-size)


class EngineServer:
    """One SGLang-protocol HTTP server: a launched subprocess or a running URL.

    Args:
        url: base URL of a running server (connect mode); None with ``launch``.
        launch: how to start it (launch mode).
        startup_timeout_s: deadline for the health wait after a (re)start.
        request_timeout_s: per-request time-out (a generation that takes longer counts as a failure).
    """

    def __init__(self, url: str | None = None, launch: ServerLaunch | None = None, *,
                 startup_timeout_s: float = 600.0, request_timeout_s: float = 600.0, index: int = 0):
        if (url is None) == (launch is None):
            raise ValueError("EngineServer needs exactly one of url= (connect) or launch= (start a subprocess)")
        self.url = url.rstrip("/") if url else ""
        self.launch_spec = launch
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.index = index
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.restarts = 0
        self.world_size = launch.world_size if launch else 1

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the subprocess (launch mode) and wait until it is healthy; connect mode: wait for health."""
        if self.launch_spec is None:
            self.wait_healthy()
            return
        spec = self.launch_spec
        log_dir = Path(spec.log_dir) if spec.log_dir else Path(os.environ.get("TMPDIR", "/tmp")) / "tapo_engines"
        log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a picked port can be taken before the server binds it
            from tapo_megatron.parallel import free_port

            port = spec.port if spec.port is not None else free_port(spec.host)
            self.url = f"http://{spec.host}:{port}"
            argv = [a.replace("{host}", spec.host).replace("{port}", str(port)) for a in spec.argv]
            self.log_path = log_dir / f"engine{self.index}-{os.getpid()}-{self.restarts}-{attempt}.log"
            log = open(self.log_path, "wb")
            env = {**os.environ, **spec.env}
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # own process group: kill its children too
            log.close()
            try:
                self.wait_healthy()
                logger.info("engine %d up at %s (log %s)", self.index, self.url, self.log_path)
                return
            except EngineError:
                self.kill()
                if spec.port is not None or "address already in use" not in self.log_tail().lower():
                    raise
        raise EngineError(f"engine {self.index}: no free port after 3 attempts (log {self.log_path})")

    def wait_healthy(self) -> None:
        """Poll ``/health_generate`` until 200 or the deadline; fail early when the process exits."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise EngineError(f"engine {self.index} exited with code {self.process.returncode} while starting; "
                                  f"log tail ({self.log_path}):\n{self.log_tail()}")
            try:
                self.request("GET", "/health_generate", timeout=10.0)
                return
            except EngineError:
                pass
            if time.monotonic() > deadline:
                raise EngineError(f"engine {self.index} at {self.url} not healthy after {self.startup_timeout_s:.0f}"
                                  f" s; log tail ({self.log_path}):\n{self.log_tail()}")
            time.sleep(0.25)

    def alive(self) -> bool:
        """The subprocess still runs (launch mode) and ``/health`` answers."""
        if self.process is not None and self.process.poll() is not None:
            return False
        try:
            self.request("GET", "/health", timeout=5.0)
            return True
        except EngineError:
            return False

    def restart(self) -> None:
        """Kill (if needed) and start again; connect mode can only wait for an external restart."""
        self.restarts += 1
        logger.warning("restarting engine %d (%s), restart #%d", self.index, self.url, self.restarts)
        if self.launch_spec is not None:
            self.kill()
        self.start()

    def kill(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL after ``grace_s``; no-op in connect mode."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def log_tail(self, n: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    # ------------------------------------------------------------------ requests

    def request(self, method: str, path: str, payload: Any = None, timeout: float | None = None) -> Any:
        """One JSON request; returns the parsed body.

        Raises:
            EngineUnavailable: connection failure, time-out or HTTP 5xx (the server may be dead: retryable).
            EngineError: HTTP 4xx or ``"success": false`` (the server refused the request).
        """
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            cls = EngineUnavailable if err.code >= 500 else EngineError
            raise cls(f"{method} {self.url}{path} -> HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            raise EngineUnavailable(f"{method} {self.url}{path} failed: {err}") from None
        body = json.loads(raw) if raw.strip() else {}
        if isinstance(body, dict) and body.get("success") is False:
            raise EngineError(f"{method} {self.url}{path} refused: {body.get('message')}")
        return body

    def post(self, path: str, payload: Any = None, timeout: float | None = None) -> Any:
        return self.request("POST", path, payload if payload is not None else {}, timeout)

    def weight_version(self) -> int | None:
        """The version the server reports (``/model_info``), None when it reports none or a non-integer."""
        info = self.request("GET", "/model_info", timeout=30.0)
        try:
            return int(info.get("weight_version"))
        except (TypeError, ValueError):
            return None


# ---------------------------------------------------------------------------------------------- the engine


@dataclass
class EngineStats:
    """Counters over the engine's life (logged by the RL loop, asserted by the fault tests)."""

    requests: int = 0  # shard requests sent (retries included)
    restarts: int = 0  # server restarts
    retried_prompts: int = 0  # prompts re-sent after a failed shard
    generated_prompts: int = 0  # prompts returned to callers (each exactly once)


def parse_generation(output: dict, fallback_version: int) -> Generation:
    """One SGLang ``/generate`` output -> ``Generation`` (token ids and log-probs from ``output_token_logprobs``)."""
    meta = output.get("meta_info") or {}
    entries = meta.get("output_token_logprobs")
    if entries is None:
        raise EngineError(f"generate output {meta.get('id')!r} has no output_token_logprobs (return_logprob lost?)")
    token_ids = [int(e[1]) for e in entries]
    logprobs = [float(e[0]) for e in entries]
    if "output_ids" in output and list(output["output_ids"]) != token_ids:
        raise EngineError(f"generate output {meta.get('id')!r}: output_ids disagree with output_token_logprobs")
    finish = (meta.get("finish_reason") or {}).get("type")
    reason = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}.get(finish, FinishReason.ABORT)
    try:
        version = int(meta["weight_version"])
    except (KeyError, TypeError, ValueError):
        version = fallback_version
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=reason, weight_version=version)


class SGLangEngine(RolloutEngine):
    """Several SGLang servers as one ``RolloutEngine``.

    Args:
        servers: the ``EngineServer`` objects (started by ``launch``/``connect``).
        max_retries: how many times one shard may be retried after failures before ``generate`` raises.
        max_prompts_per_request: cap on the prompts of one ``/generate`` request (a shard is split above it).
    """

    def __init__(self, servers: Sequence[EngineServer], *, max_retries: int = 3, max_prompts_per_request: int = 1024):
        if not servers:
            raise ValueError("SGLangEngine needs at least one server")
        self.servers = list(servers)
        self.max_retries = max_retries
        self.max_prompts_per_request = max_prompts_per_request
        self.stats = EngineStats()
        self.reload_path: str | None = None  # a checkpoint of the current version, for restarted servers
        self._version = 0
        self._closed = False
        self._calls = itertools.count()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.servers)), thread_name_prefix="sglang")

    @classmethod
    def launch(cls, launches: Sequence[ServerLaunch], *, startup_timeout_s: float = 600.0,
               request_timeout_s: float = 600.0, **kwargs: Any) -> "SGLangEngine":
        """Start one server per launch spec (in parallel) and wait until all are healthy."""
        servers = [EngineServer(launch=spec, startup_timeout_s=startup_timeout_s, request_timeout_s=request_timeout_s,
                                index=i) for i, spec in enumerate(launches)]
        engine = cls(servers, **kwargs)
        try:
            list(engine._pool.map(lambda s: s.start(), servers))
        except BaseException:
            engine.shutdown()
            raise
        return engine

    @classmethod
    def connect(cls, urls: Sequence[str], *, startup_timeout_s: float = 600.0, request_timeout_s: float = 600.0,
                world_sizes: Sequence[int] | None = None, **kwargs: Any) -> "SGLangEngine":
        """Use running servers; ``world_sizes``: GPUs per server (default: its ``/server_info`` tp_size)."""
        servers = [EngineServer(url=u, startup_timeout_s=startup_timeout_s, request_timeout_s=request_timeout_s,
                                index=i) for i, u in enumerate(urls)]
        for i, server in enumerate(servers):
            server.start()
            if world_sizes is not None:
                server.world_size = int(world_sizes[i])
            else:
                info = server.request("GET", "/server_info", timeout=30.0)
                server.world_size = int(info.get("tp_size", 1)) * int(info.get("pp_size", 1) or 1)
        engine = cls(servers, **kwargs)
        versions = {s.weight_version() for s in servers}
        if len(versions) == 1 and None not in versions:
            engine._version = versions.pop()
        return engine

    # ------------------------------------------------------------------ interface

    @property
    def weight_version(self) -> int:
        return self._version

    def set_weight_version(self, version: int) -> None:
        """Record the version every server now serves (called by the weight-sync transports after a commit)."""
        self._version = int(version)

    def health(self) -> bool:
        return not self._closed and all(s.alive() for s in self.servers)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Shard ``prompts`` over the servers, one batch request each; retry failed shards after restarting their
        server. Returns one Generation per prompt, in order. A per-prompt ``sampling_seed`` (``params.seed`` +
        prompt index) makes seeded sampling independent of the sharding."""
        self._check_open()
        check_sampling_params(params)
        if not prompts:
            return []
        call = next(self._calls)
        results: list[Generation | None] = [None] * len(prompts)
        n = len(self.servers)
        per = -(-len(prompts) // n)
        pending: list[tuple[int, list[int], int]] = []  # (server, prompt indices, attempt)
        for srv, first in enumerate(range(0, len(prompts), per)):
            idx = list(range(first, min(first + per, len(prompts))))
            pending += [(srv, idx[j:j + self.max_prompts_per_request], 0)
                        for j in range(0, len(idx), self.max_prompts_per_request)]
        while pending:
            # Fresh ids per attempt: a late answer to a failed attempt can never be taken for the retry's.
            rids = [[f"tapo-{call}-{i}-a{attempt}-{uuid.uuid4().hex[:6]}" for i in idx] for _, idx, attempt in pending]
            futures = [self._pool.submit(self._run_shard, self.servers[srv], prompts, idx, params, shard_rids)
                       for (srv, idx, _), shard_rids in zip(pending, rids)]
            retry: list[tuple[int, list[int], int]] = []
            dead: set[int] = set()
            for (srv, idx, attempt), shard_rids, future in zip(pending, rids, futures):
                try:
                    outputs = future.result()
                except EngineUnavailable as err:
                    if attempt >= self.max_retries:
                        raise EngineError(f"{len(idx)} prompt(s) failed {attempt + 1} times; last: {err}") from None
                    logger.warning("request to engine %d failed (%s); recovering and retrying", srv, err)
                    dead.add(srv)
                    self._abort(self.servers[srv], shard_rids)  # a live but slow server must not keep working
                    retry.append((srv, idx, attempt + 1))
                    continue
                aborted = []
                for i, output in zip(idx, outputs):
                    generation = parse_generation(output, self._version)
                    if generation.finish_reason == FinishReason.ABORT:
                        aborted.append(i)  # e.g. aborted by a weight sync's pause: sample it again
                    elif results[i] is not None:  # cannot happen by construction; refuse rather than double-count
                        raise EngineError(f"prompt {i} answered twice; refusing the duplicate")
                    else:
                        results[i] = generation
                if aborted:
                    if attempt >= self.max_retries:
                        raise EngineError(f"{len(aborted)} prompt(s) aborted by engine {srv} {attempt + 1} times")
                    retry.append((srv, aborted, attempt + 1))
            for srv in sorted(dead):
                self._recover(self.servers[srv])
            self.stats.retried_prompts += sum(len(idx) for _, idx, _ in retry)
            pending = retry
        self.stats.generated_prompts += len(prompts)
        return results  # type: ignore[return-value]  # every slot filled exactly once above

    def _run_shard(self, server: EngineServer, prompts: list[list[int]], idx: list[int], params: SamplingParams,
                   rids: list[str]) -> list[dict]:
        seeds = [None if params.seed is None else params.seed + i for i in idx]
        payload = generate_payload([prompts[i] for i in idx], params, rids, seeds)
        with self._lock:
            self.stats.requests += 1
        outputs = server.post("/generate", payload)
        if isinstance(outputs, dict):
            outputs = [outputs]
        if len(outputs) != len(idx):
            raise EngineError(f"{server.url}/generate returned {len(outputs)} outputs for {len(idx)} prompts")
        for rid, output in zip(rids, outputs):
            got = (output.get("meta_info") or {}).get("id")
            if got is not None and got != rid:
                raise EngineError(f"{server.url}/generate answered request {got!r} in the slot of {rid!r}")
        return outputs

    @staticmethod
    def _abort(server: EngineServer, rids: list[str]) -> None:
        """Best effort: tell a server to drop requests whose answers will be ignored (dead servers ignore it)."""
        for rid in rids:
            try:
                server.post("/abort_request", abort_payload(rid), timeout=5.0)
            except EngineError:
                return

    def _recover(self, server: EngineServer) -> None:
        """Bring a failed server back: restart it when it is dead (launch mode) or wait for health (connect mode);
        reload the current weights when a checkpoint of them is known."""
        if server.alive():
            return  # a time-out or transient error: the retry goes to the same live server
        if server.launch_spec is None:
            server.wait_healthy()
        else:
            server.restart()
        self.stats.restarts += 1
        if self.reload_path is not None:
            server.post("/update_weights_from_disk", update_disk_payload(self.reload_path, self._version))
        reported = server.weight_version()
        if reported != self._version:
            logger.warning("engine %d restarted serving weight version %s (current %d); its rollouts are tagged "
                           "with that version until the next sync", server.index, reported, self._version)

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """Colocated push (CUDA IPC, update-from-tensor) of HF-named buckets; the version is set with the last
        bucket. Use ``training.weight_sync.TensorWeightSync`` (which calls this) rather than calling it directly."""
        from tapo_megatron.training.weight_sync.tensor import push_buckets_via_ipc

        self._check_open()
        push_buckets_via_ipc(self, buckets, version)
        self._version = version

    def flush_cache(self) -> None:
        for server in self.servers:
            deadline = time.monotonic() + 60.0
            while True:  # SGLang refuses to flush while requests run; they drain quickly
                try:
                    server.post("/flush_cache")
                    break
                except EngineError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def release_memory(self) -> None:
        self.flush_cache()
        for server in self.servers:
            server.post("/release_memory_occupation", memory_payload())

    def resume_memory(self) -> None:
        for server in self.servers:
            server.post("/resume_memory_occupation", memory_payload())

    def pause_generation(self) -> None:
        for server in self.servers:
            server.post("/pause_generation", pause_payload())

    def continue_generation(self) -> None:
        for server in self.servers:
            server.post("/continue_generation", {})

    def shutdown(self) -> None:
        """Kill launched servers (connected ones are left running) and stop the request threads."""
        self._closed = True
        for server in self.servers:
            server.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("SGLangEngine was shut down")

