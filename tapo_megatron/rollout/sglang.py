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
current version (``reload_path``, set by the disk transport) it reloads it; otherwise it is stale
(``stale_servers``): it gets no prompts while another server is current, and the loop re-syncs it before the next
rollout (its update group is rebuilt: ``lost_groups``).

Receiving weights (the SGLang 0.5.23 protocol, docs/rollout.md): each sync is one session per server -
``/pause_generation`` -> ``/begin_weight_update`` -> buckets (``update_weights_from_tensor`` /
``update_weights_from_distributed``) -> ``/end_weight_update`` -> ``/update_weight_version`` -> ``/flush_cache`` ->
``/continue_generation``; a failed session leaves the engine paused and refusing ``generate`` (SGLang loads buckets
into the live model). Responses are parsed as SGLang writes them (``parse_response``: JSON, text or empty).

The request payloads are built by the ``*_payload`` functions below, which ``tests/test_sglang_contract.py`` checks
against SGLang's own request dataclasses (``sglang.srt.managers.io_struct``), server-argument parser, HTTP handlers
and weight-update managers; nothing here imports sglang (the trainer environment need not have it), except the
colocated CUDA-IPC serializer, which runs where SGLang does.

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
from tapo_megatron.rollout.buckets import Bucket, FlatBucket, flatten_by_dtype

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """An engine server that cannot serve: failed to start, died, or refused a request (message names the URL)."""


class EngineUnavailable(EngineError):
    """A request could not reach a live server (connection refused/reset, time-out, process gone): retryable."""


def parse_response(raw: bytes, content_type: str) -> Any:
    """A response body as SGLang's HTTP layer (``sglang.srt.entrypoints.http_server``) writes it: JSON
    (``ORJSONResponse``: the weight-update endpoints, ``/generate``, ``/model_info``; FastAPI's ``null`` for
    ``/release_memory_occupation``) or plain text (``/flush_cache``: ``Response(content="Cache flushed...")``), or
    nothing (``/health``, ``/abort_request``: an empty 200). Returns the parsed JSON, the text, or None."""
    if not raw.strip():
        return None
    if "json" in content_type.lower():
        return json.loads(raw)
    return raw.decode(errors="replace")


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
    """``/init_weights_update_group`` body (InitWeightsUpdateGroupReqInput). SGLang's model-runner
    ``WeightUpdater.init_weights_update_group`` joins as rank ``rank_offset + tp_rank``."""
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def begin_payload() -> dict[str, Any]:
    """``/begin_weight_update`` body (BeginWeightUpdateReqInput): opens the session on every runner. SGLang's
    ``SchedulerWeightUpdaterManager.update_weights_from_{distributed,tensor}`` refuse any update outside one."""
    return {"selector": "all"}


def end_payload() -> dict[str, Any]:
    """``/end_weight_update`` body (EndWeightUpdateReqInput, no fields). SGLang's ``end_weight_update`` runs
    ``post_load_weights`` only when no bucket was loaded in the session, then ``postprocess_weights``."""
    return {}


def update_distributed_payload(flat: FlatBucket, group_name: str) -> dict[str, Any]:
    """``/update_weights_from_distributed`` body (UpdateWeightsFromDistributedReqInput) for one flattened bucket:
    ``load_format="flattened_bucket"`` makes SGLang's ``receive_weights_from_distributed`` allocate one buffer
    (``FlattenedTensorBucket.empty``) and receive it with ONE broadcast from group rank 0. No flush and no version
    per bucket: the session's close commits both (``commit_payload``, then ``/flush_cache``)."""
    return {
        "names": [m.name for m in flat.metadata],
        "dtypes": [str(m.dtype).removeprefix("torch.") for m in flat.metadata],
        "shapes": [list(m.shape) for m in flat.metadata],
        "group_name": group_name,
        "flush_cache": False,
        "abort_all_requests": False,
        "weight_version": None,
        "load_format": "flattened_bucket",
    }


def update_tensor_payload(serialized_per_rank: Sequence[str]) -> dict[str, Any]:
    """``/update_weights_from_tensor`` body (UpdateWeightsFromTensorReqInput): one base64 payload per engine TP
    rank, index = TP rank (SGLang's ``TpModelWorker.deserialize_own_rank`` opens only its own); each payload is a
    flattened bucket whose CUDA IPC handle points at memory on that rank's GPU."""
    return {"serialized_named_tensors": list(serialized_per_rank), "load_format": "flattened_bucket",
            "flush_cache": False, "abort_all_requests": False, "weight_version": None}


def update_disk_payload(model_path: str, weight_version: int) -> dict[str, Any]:
    """``/update_weights_from_disk`` body (UpdateWeightFromDiskReqInput): needs no session in 0.5.23; SGLang's
    ``update_weights_from_disk`` records the version and flushes the cache itself."""
    return {"model_path": str(model_path), "weight_version": str(weight_version), "flush_cache": True,
            "abort_all_requests": False}


def weight_version_payload(version: int) -> dict[str, Any]:
    """``/update_weight_version`` body (UpdateWeightVersionReqInput): the commit after a closed session. Its
    default ``abort_all_requests=True`` is turned off: generation is already paused."""
    return {"new_version": str(version), "abort_all_requests": False}


def pause_payload() -> dict[str, Any]:
    """``/pause_generation`` body: abort anything in flight (the adapter retries it), so no rollout mixes versions."""
    return {"mode": "abort"}


def continue_payload() -> dict[str, Any]:
    """``/continue_generation`` body (ContinueGenerationReqInput; its ``torch_empty_cache=True`` default returns
    the allocator blocks the update left behind)."""
    return {}


def abort_payload(rid: str) -> dict[str, Any]:
    """``/abort_request`` body (AbortReq) for one request id."""
    return {"rid": rid}


def memory_payload(tags: Sequence[str] | None = None) -> dict[str, Any]:
    """``/release_memory_occupation`` and ``/resume_memory_occupation`` body; None: every tag SGLang knows
    (``GPU_MEMORY_ALL_TYPES``: weights, KV cache, CUDA graphs)."""
    return {"tags": list(tags) if tags is not None else None}


def weights_by_name_payload(name: str, truncate_size: int) -> dict[str, Any]:
    """``/get_weights_by_name`` body (GetWeightsByNameReqInput)."""
    return {"name": name, "truncate_size": int(truncate_size)}


def sglang_server_argv(model_path: str, *, tp_size: int = 1, mem_fraction_static: float | None = None,
                       enable_memory_saver: bool = False, random_seed: int | None = None,
                       base_gpu_id: int | None = None, deterministic: bool = False,
                       extra: dict[str, Any] | None = None, python: str = sys.executable) -> list[str]:
    """``python -m sglang.launch_server`` argv with ``{host}``/``{port}`` placeholders (filled at launch).

    ``enable_memory_saver``: needed for ``/release_memory_occupation`` when engines share the training GPUs.
    ``base_gpu_id``: the engine's first GPU (its TP ranks use ``base_gpu_id .. base_gpu_id + tp_size - 1``).
    ``deterministic``: ``--enable-deterministic-inference``; without it SGLang ignores ``sampling_seed``
    (``SamplingBatchInfo.from_schedule_batch`` builds the seed tensor only in that mode).
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
    if base_gpu_id is not None:
        argv += ["--base-gpu-id", str(base_gpu_id)]
    if deterministic:
        argv += ["--enable-deterministic-inference"]
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


def _open_session(server: "EngineServer") -> None:
    """``/begin_weight_update``; a session left open by an earlier trainer that died mid-sync is closed first
    (SGLang refuses a second ``begin`` with "already open")."""
    try:
        server.post("/begin_weight_update", begin_payload())
    except EngineError as err:
        if "already open" not in str(err):
            raise
        logger.warning("engine %d had a weight-update session open (a sync died?): closing it", server.index)
        server.post("/end_weight_update", end_payload())
        server.post("/begin_weight_update", begin_payload())


def _free_device_bytes() -> int | None:
    """Free memory of this process's GPU (None on CPU): what a colocated engine's release gives back."""
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------- CUDA-IPC payloads


@dataclass
class TensorPayload:
    """One flattened dtype group of a bucket for ``/update_weights_from_tensor``: ``per_server[i][r]`` is the
    serialized payload for TP rank ``r`` of server ``i``, built by the trainer rank on that rank's GPU."""

    per_server: list[list[str]]
    nbytes: int

    def for_server(self, index: int) -> list[str]:
        return self.per_server[index]


def serialize_flat_bucket(flat: FlatBucket) -> str:
    """A FlatBucket as SGLang's flattened-bucket payload, base64 (``MultiprocessingSerializer``: a CUDA tensor
    travels as an IPC handle). The sender applies SGLang's ``monkey_patch_torch_reductions`` first, as SGLang's own
    ``weight_sync.utils.update_weights`` does, so the handle names its device by UUID (the receiver, patched the
    same way in ``TpModelWorker.deserialize_own_rank``, maps it to its own index under its CUDA_VISIBLE_DEVICES).
    Needs sglang importable (true wherever SGLang engines share the GPUs)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    if flat.flat.is_cuda:  # the patch rewrites the CUDA reduction's device argument; CPU tensors pickle as they are
        monkey_patch_torch_reductions()
    # SGLang's own metadata class, so the engine process can unpickle it without importing tapo_megatron.
    metadata = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                        end_idx=m.end_idx, numel=m.numel) for m in flat.metadata]
    return MultiprocessingSerializer.serialize({"flattened_tensor": flat.flat, "metadata": metadata},
                                               output_str=True)


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
        self.served_version: int | None = 0  # the version this server serves, as far as the engine knows
        self.group_epoch = 0  # ``restarts`` when its weight-update group was made (differs: the group is gone)

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
        """One request; returns the body as SGLang wrote it (``parse_response``).

        Raises:
            EngineUnavailable: connection failure, time-out or HTTP 5xx (the server may be dead: retryable).
            EngineError: HTTP 4xx or ``"success": false`` (the server refused the request).
        """
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout_s) as resp:
                raw, ctype = resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            cls = EngineUnavailable if err.code >= 500 else EngineError
            raise cls(f"engine {self.index} ({self.url}): {method} {path} -> HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            raise EngineUnavailable(f"engine {self.index} ({self.url}): {method} {path} failed: {err}") from None
        body = parse_response(raw, ctype)
        if isinstance(body, dict) and body.get("success") is False:
            raise EngineError(f"engine {self.index} ({self.url}): {method} {path} refused: {body.get('message')}")
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

    def __init__(self, servers: Sequence[EngineServer], *, max_retries: int = 3, max_prompts_per_request: int = 1024,
                 seeded: bool = True):
        if not servers:
            raise ValueError("SGLangEngine needs at least one server")
        self.servers = list(servers)
        self.max_retries = max_retries
        self.max_prompts_per_request = max_prompts_per_request
        self.seeded = seeded  # send per-prompt sampling seeds (they hold only under deterministic inference)
        self.stats = EngineStats()
        self.reload_path: str | None = None  # a checkpoint of the current version, for restarted servers
        self._version = 0
        self._broken: str | None = None  # set while the engine holds a partial update (refuses generate)
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
                world_sizes: Sequence[int] | None = None, require_deterministic: bool = False,
                **kwargs: Any) -> "SGLangEngine":
        """Use running servers; ``world_sizes``: GPUs per server (default: its ``/server_info`` tp_size);
        ``require_deterministic``: refuse servers whose ``/server_info`` lacks ``enable_deterministic_inference``."""
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
        if require_deterministic:
            for server in servers:
                info = server.request("GET", "/server_info", timeout=30.0) or {}
                if not info.get("enable_deterministic_inference"):
                    raise EngineError(f"engine {server.index} ({server.url}) runs without "
                                      "--enable-deterministic-inference, so SGLang ignores sampling seeds and seeded "
                                      "rollouts are not reproducible; restart it with the flag or set "
                                      "rollout.deterministic_inference=false")
        versions = {s.weight_version() for s in servers}
        if len(versions) == 1 and None not in versions:
            engine._version = versions.pop()
        for server in servers:
            server.served_version = engine._version
        return engine

    # ------------------------------------------------------------------ interface

    @property
    def weight_version(self) -> int:
        return self._version

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
        if self._broken is not None:
            raise EngineError(self._broken)
        call = next(self._calls)
        results: list[Generation | None] = [None] * len(prompts)
        serving = self._serving()
        per = -(-len(prompts) // len(serving))
        pending: list[tuple[int, list[int], int]] = []  # (server, prompt indices, attempt)
        for srv, first in zip(serving, range(0, len(prompts), per)):
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
        seeds = [None if params.seed is None or not self.seeded else params.seed + i for i in idx]
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

    def _serving(self) -> list[int]:
        """Indices of the servers that get prompts: those serving the current weights; all of them when none does
        (their generations then carry the old version and the loop's staleness rule resamples them)."""
        current = [i for i, s in enumerate(self.servers) if s.served_version == self._version]
        return current or list(range(len(self.servers)))

    def _recover(self, server: EngineServer) -> None:
        """Bring a failed server back: restart it when it is dead (launch mode) or wait for health (connect mode);
        reload the current weights when a checkpoint of them is known, else mark it stale (``stale_servers``)."""
        if server.alive():
            return  # a time-out or transient error: the retry goes to the same live server
        if server.launch_spec is None:
            server.wait_healthy()
            server.restarts += 1  # connect mode: someone else restarted it; its update group is gone all the same
        else:
            server.restart()
        self.stats.restarts += 1
        server.served_version = server.weight_version()
        if self.reload_path is not None:
            server.post("/update_weights_from_disk", update_disk_payload(self.reload_path, self._version))
            server.served_version = self._version
        if server.served_version != self._version:
            logger.warning("engine %d restarted serving weight version %s (current %d): no prompts go to it until "
                           "the next weight sync", server.index, server.served_version, self._version)

    def stale_servers(self) -> list[int]:
        """Servers that do not serve the current version (restarted, or never synced): the loop re-syncs them."""
        return [i for i, s in enumerate(self.servers) if s.served_version != self._version]

    # ------------------------------------------------------------------ receiving weights (one method per transport)
    # A session per sync, as SGLang 0.5.23 requires: pause -> begin -> buckets -> end -> version -> flush -> continue.

    def _each(self, what: str, version: int, call) -> list[Any]:
        """Run ``call(server)`` on every server concurrently; the first failure raises one EngineError naming the
        engine, the step and the weight version."""
        futures = [self._pool.submit(call, server) for server in self.servers]
        out, first = [], None
        for server, future in zip(self.servers, futures):
            try:
                out.append(future.result())
            except EngineError as err:
                first = first or EngineError(f"weight update to version {version}, {what}: {err}")
        if first is not None:
            raise first
        return out

    def begin_weight_update(self, version: int) -> None:
        """Pause generation (mode ``abort``: in-flight requests come back aborted and are resampled) and open a
        weight-update session on every server (SGLang ``SchedulerWeightUpdaterManager.begin_weight_update``)."""
        self._check_open()
        self._each("pause", version, lambda s: s.post("/pause_generation", pause_payload()))
        self._each("open session", version, _open_session)

    def end_weight_update(self, version: int, ok: bool = True, reason: str = "") -> None:
        """Close the session on every server (SGLang ``end_weight_update``); on success set the version
        (``/update_weight_version``), drop the prefix cache computed with the old weights (``/flush_cache``) and
        resume generation. On failure (``ok=False``) the engine stays paused and refuses ``generate``: SGLang loads
        buckets into the live model, so it now holds a mix; the next successful sync resumes it."""
        if not ok:
            try:  # best effort: a server that never opened the session (or died) has nothing to close
                self._each("close session", version, lambda s: s.post("/end_weight_update", end_payload()))
            except EngineError as err:
                logger.warning("%s", err)
            self._broken = (f"engine holds a partial weight update to version {version} ({reason}); it stays "
                            f"paused until a weight sync completes")
            for server in self.servers:
                server.served_version = None
            return
        self._each("close session", version, lambda s: s.post("/end_weight_update", end_payload()))
        self._each("set version", version, lambda s: s.post("/update_weight_version", weight_version_payload(version)))
        self.flush_cache()
        self._each("continue", version, lambda s: s.post("/continue_generation", continue_payload()))
        self._version, self._broken = int(version), None
        for server in self.servers:
            server.served_version = self._version

    def update_weights_from_tensor(self, buckets: Iterable, version: int) -> None:
        """Colocated push: one session; per bucket, one ``/update_weights_from_tensor`` per flattened dtype group
        with one CUDA-IPC payload per engine TP rank (``TensorPayload``: built by the trainer rank on that rank's
        GPU); a plain bucket is accepted for TP-1 engines (serialized here). Atomic from the caller's view: on
        any failure the engine stays paused and refuses generation until a sync completes."""
        self.begin_weight_update(version)
        try:
            for item in buckets:
                for payload in (item if isinstance(item, list) and item and isinstance(item[0], TensorPayload)
                                else self._local_payloads(item)):
                    self._each("tensor bucket", version,
                               lambda s, p=payload: s.post("/update_weights_from_tensor",
                                                           update_tensor_payload(p.for_server(s.index))))
        except BaseException as err:
            self.end_weight_update(version, ok=False, reason=f"{type(err).__name__}: {err}")
            raise
        self.end_weight_update(version)

    update_weights = update_weights_from_tensor  # the interface's in-process name; same semantics

    def _local_payloads(self, bucket: Bucket) -> list["TensorPayload"]:
        if any(s.world_size != 1 for s in self.servers):
            raise EngineError("a plain bucket can only feed TP-1 engines; TP>1 engines need one payload per TP "
                              "rank from the trainer rank on that GPU (TensorWeightSync with an ipc group)")
        return [TensorPayload([[serialize_flat_bucket(flat)]] * len(self.servers), flat.nbytes)
                for flat in flatten_by_dtype(bucket)]

    def init_weights_update_group(self, master_address: str, master_port: int, group_name: str, backend: str,
                                  join, servers: Sequence[int] | None = None) -> None:
        """Create one update group with the given servers (default: all; SGLang ``init_weights_update_group``:
        server ``i`` joins at ``rank_offset`` 1 + the TP sizes before it). ``join(world_size)`` joins the trainer
        side as rank 0 while the servers' requests are in flight (the rendezvous needs both)."""
        chosen = [self.servers[i] for i in (range(len(self.servers)) if servers is None else servers)]
        world = 1 + sum(s.world_size for s in chosen)
        offsets = [1 + sum(s.world_size for s in chosen[:i]) for i in range(len(chosen))]
        futures = [self._pool.submit(s.post, "/init_weights_update_group",
                                     init_group_payload(master_address, master_port, off, world, group_name, backend))
                   for s, off in zip(chosen, offsets)]
        join(world)
        for server, future in zip(chosen, futures):
            try:
                future.result()
            except EngineError as err:
                raise EngineError(f"init weight update group {group_name!r}: {err}") from None
            server.group_epoch = server.restarts

    def destroy_weights_update_group(self, group_name: str, servers: Sequence[int] | None = None) -> None:
        """Best effort (a restarted server has no group left: SGLang answers 400, ignored)."""
        for i in range(len(self.servers)) if servers is None else servers:
            try:
                self.servers[i].post("/destroy_weights_update_group", {"group_name": group_name}, timeout=30.0)
            except EngineError:
                pass

    def lost_groups(self) -> list[int]:
        """Servers restarted since their update group was created: those groups must be rebuilt before a sync."""
        return [i for i, s in enumerate(self.servers) if s.group_epoch != s.restarts]

    def update_weights_from_distributed(self, flat: FlatBucket, group_name: str, version: int, send,
                                        servers: Sequence[int] | None = None) -> None:
        """Announce one flattened bucket to the given servers (default: all; ``/update_weights_from_distributed``,
        inside the open session), then ``send()`` broadcasts it as group rank 0 while they receive; waits for every
        answer and raises one EngineError naming the engine(s) and the version."""
        chosen = [self.servers[i] for i in (range(len(self.servers)) if servers is None else servers)]
        payload = update_distributed_payload(flat, group_name)
        futures = [self._pool.submit(s.post, "/update_weights_from_distributed", payload) for s in chosen]
        errors = []
        try:
            send()
        except Exception as err:  # noqa: BLE001 - a peer that died mid-broadcast: name it below
            errors.append(f"broadcast failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
        for future in futures:
            try:
                future.result()
            except EngineError as err:
                errors.append(str(err))
        if errors:
            errors += [f"engine {s.index} ({s.url}) is down" for s in chosen if not s.alive()]
            raise EngineError(f"weight update to version {version}, bucket of {len(flat.metadata)} tensor(s): "
                              + "; ".join(errors))

    def update_weights_from_disk(self, path: str, version: int) -> None:
        """Every server loads the HF checkpoint at ``path`` (SGLang ``update_weights_from_disk``: no session, sets
        the version and flushes the cache itself); restarted servers reload it too (``reload_path``)."""
        self._check_open()
        self._each("load from disk", version, lambda s: s.post("/update_weights_from_disk",
                                                               update_disk_payload(path, version)))
        self._version, self._broken, self.reload_path = int(version), None, str(path)
        for server in self.servers:
            server.served_version = self._version

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """From the ``config.json`` of the model each server loaded (``/model_info`` ``model_path``), when that
        folder is readable here; None when it is not (or the servers disagree, which is reported by name)."""
        from tapo_megatron.convert.qwen3 import hf_shapes
        from tapo_megatron.models.qwen3 import Qwen3Shape

        found = None
        for server in self.servers:
            info = server.request("GET", "/model_info", timeout=30.0) or {}
            config = Path(str(info.get("model_path") or "")) / "config.json"
            if not info.get("model_path") or not config.is_file():
                return None
            shapes = hf_shapes(Qwen3Shape.from_hf(json.loads(config.read_text())))
            if found is not None and shapes != found:
                raise EngineError(f"engine {server.index} ({server.url}) serves a model of another shape than engine 0")
            found = shapes
        return found

    def prompt_logprobs(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per server: log p(tokens[:, t] | tokens[:, :t]) for t >= 1 (``input_token_logprobs`` from position 0)."""
        prompts = tokens.tolist()
        params = SamplingParams(temperature=0.0, max_new_tokens=1)
        out = []
        for server in self.servers:
            rids = [f"tapo-probe-{server.index}-{uuid.uuid4().hex[:6]}-{i}" for i in range(len(prompts))]
            outputs = server.post("/generate", generate_payload(prompts, params, rids, prompt_logprobs=True))
            rows = [[e[0] for e in o["meta_info"]["input_token_logprobs"][1:]] for o in outputs]
            out.append(torch.tensor(rows, dtype=torch.float32))
        return out

    def flush_cache(self) -> None:
        """``/flush_cache`` on every server. SGLang answers in plain text and refuses (HTTP 400) while requests
        run or wait; they drain quickly after a pause, so refusals are retried for up to a minute."""
        for server in self.servers:
            deadline = time.monotonic() + 60.0
            while True:
                try:
                    server.post("/flush_cache")
                    break
                except EngineError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def release_memory(self) -> dict[str, float]:
        """Free the engines' GPU memory (weights, KV cache, CUDA graphs) for the train step. SGLang asserts the
        server is idle (``release_memory_occupation``), so generation is paused first; refused when the engine
        holds a partial update. Returns ``engine/release_seconds``."""
        if self._broken is not None:
            raise EngineError(self._broken)
        start = time.perf_counter()
        free_before = _free_device_bytes()
        for server in self.servers:
            server.post("/pause_generation", pause_payload())
        for server in self.servers:
            server.post("/release_memory_occupation", memory_payload())
        metrics = {"engine/release_seconds": time.perf_counter() - start}
        if free_before is not None:  # colocated: the engine's memory comes back on this process's GPU
            metrics["engine/released_gb"] = (_free_device_bytes() - free_before) / 1e9
        return metrics

    def resume_memory(self) -> dict[str, float]:
        start = time.perf_counter()
        for server in self.servers:
            server.post("/resume_memory_occupation", memory_payload())
        for server in self.servers:
            server.post("/continue_generation", continue_payload())
        return {"engine/resume_seconds": time.perf_counter() - start}

    def pause_generation(self) -> None:
        for server in self.servers:
            server.post("/pause_generation", pause_payload())

    def continue_generation(self) -> None:
        for server in self.servers:
            server.post("/continue_generation", continue_payload())

    def shutdown(self) -> None:
        """Kill launched servers (connected ones are left running) and stop the request threads."""
        self._closed = True
        for server in self.servers:
            server.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("SGLangEngine was shut down")

