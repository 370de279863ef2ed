"""A native engine served in its own process over HTTP, speaking the subset of SGLang's protocol the trainer uses.

Why: the disaggregated weight sync and the engine-restart logic must be testable on CPU, where SGLang cannot run.
This server answers the same endpoints with the same JSON bodies as an SGLang server (``sglang.srt.entrypoints.
http_server``), so ``rollout.sglang.SGLangEngine`` and ``training.weight_sync.DistributedWeightSync`` drive it with
exactly the code they use against SGLang; only the transport backend differs (gloo here, NCCL on GPU).

Run:
    python -m tapo_megatron.rollout.remote --model-path HF_DIR --port 30000 [--host 127.0.0.1]

Endpoints (request body -> response), as in SGLang:
    GET  /health, /health_generate                  -> 200 when serving
    GET  /model_info                                -> {"model_path", "weight_version": "3", ...}
    GET  /server_info                               -> {"model_path", "tp_size": 1, "weight_version", ...}
    POST /generate  GenerateReqInput(input_ids, sampling_params, rid, return_logprob, logprob_start_len)
                    -> one output per prompt: {"text", "output_ids", "meta_info": {"id", "finish_reason",
                       "output_token_logprobs": [[logprob, token_id, null], ...], "input_token_logprobs"?,
                       "weight_version", "prompt_tokens", "completion_tokens"}}
    POST /init_weights_update_group      {master_address, master_port, rank_offset, world_size, group_name, backend}
    POST /begin_weight_update, /end_weight_update   a weight-update session, with SGLang 0.5.23's rules and messages
    POST /update_weights_from_distributed {names, dtypes, shapes, group_name, load_format, ...}: refused outside a
                                         session; load_format "flattened_bucket": one buffer, one broadcast
    POST /update_weight_version          {new_version, abort_all_requests}
    POST /destroy_weights_update_group   {group_name}
    POST /update_weights_from_disk       {model_path, load_format, weight_version, flush_cache, ...}
    POST /get_weights_by_name            {name, truncate_size} -> first ``truncate_size`` values, flattened
    GET|POST /flush_cache, POST /release_memory_occupation, /resume_memory_occupation, /pause_generation,
    /continue_generation, /abort_request
Weight-update POSTs answer {"success": bool, "message": str} (HTTP 400 when false); /flush_cache answers plain text,
/health an empty 200, the memory endpoints null, as SGLang's http_server does.

Atomic weight updates (stronger than SGLang, which writes each bucket into the live model): broadcast buckets are
staged, not applied. The staged set is committed - validated in full and copied into the model in one step by
``NativeEngine.update_weights`` - when a request carries a weight version (``/update_weight_version``, or an
``update_weights_from_distributed`` bucket with ``weight_version``). A sync that stops half-way therefore leaves the
previous weights and version serving; its partial stage is dropped when the next session opens
(``/begin_weight_update``), at a group (re)initialisation, or when a tensor name arrives twice.

``--generate-delay-s`` sleeps before each generation: fault-injection tests use it to kill the server while a
request is in flight. Each served request is logged as ``served rid=<rid>`` (tests count these lines).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from tapo_megatron.records import FinishReason, SamplingParams
from tapo_megatron.rollout.base import WeightUpdateError
from tapo_megatron.rollout.buckets import empty_flat_bucket, unflatten
from tapo_megatron.rollout.native import NativeEngine

logger = logging.getLogger("tapo.remote_engine")

# SGLang sends dtypes as strings such as "torch.bfloat16" (str(torch.dtype)) or "bfloat16".
_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32",
                                                   "uint8")}


def parse_dtype(text: str) -> torch.dtype:
    """``"torch.float32"`` or ``"float32"`` -> ``torch.float32``; unknown names raise naming the value."""
    key = str(text).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {text!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


@dataclass
class TextReply:
    """A plain-text answer (SGLang's ``/flush_cache`` writes ``Response(content=...)``, not JSON)."""

    text: str


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); the message names the bad field."""


@dataclass
class _Transaction:
    """Tensors received for the weight update in progress, not yet applied."""

    staged: dict[str, torch.Tensor] = field(default_factory=dict)


class NativeEngineServer:
    """The request handlers, independent of HTTP (an ``http.server`` front end is in ``serve``).

    Args:
        engine: the served engine (its process owns it).
        model_path: reported by ``/model_info`` and ``/server_info``.
        generate_delay_s: sleep before each generation (fault-injection tests only).
    """

    def __init__(self, engine: NativeEngine, model_path: str = "", generate_delay_s: float = 0.0):
        self.engine = engine
        self.model_path = model_path
        self.generate_delay_s = generate_delay_s
        self._weights_lock = threading.Lock()  # generation and weight commits never interleave
        self._stage_lock = threading.Lock()
        self._transaction = _Transaction()
        self._groups: dict[str, torch.distributed.ProcessGroup] = {}
        self._session_open = False
        self.routes: dict[tuple[str, str], Callable[[dict], Any]] = {
            ("GET", "/health"): lambda body: None,  # SGLang: an empty 200
            ("GET", "/health_generate"): self.health_generate,
            ("GET", "/model_info"): self.model_info,
            ("GET", "/server_info"): self.server_info,
            ("GET", "/flush_cache"): self.flush_cache,
            ("POST", "/flush_cache"): self.flush_cache,
            ("POST", "/generate"): self.generate,
            ("POST", "/init_weights_update_group"): self.init_weights_update_group,
            ("POST", "/begin_weight_update"): self.begin_weight_update,
            ("POST", "/end_weight_update"): self.end_weight_update,
            ("POST", "/destroy_weights_update_group"): self.destroy_weights_update_group,
            ("POST", "/update_weights_from_distributed"): self.update_weights_from_distributed,
            ("POST", "/update_weight_version"): self.update_weight_version,
            ("POST", "/update_weights_from_disk"): self.update_weights_from_disk,
            ("POST", "/get_weights_by_name"): self.get_weights_by_name,
            ("POST", "/release_memory_occupation"): self._null(self.engine.release_memory),
            ("POST", "/resume_memory_occupation"): self._null(self.engine.resume_memory),
            ("POST", "/pause_generation"): self.pause_generation,
            ("POST", "/continue_generation"): lambda body: {"message": "Generation continued successfully.",
                                                            "status": "ok"},
            ("POST", "/abort_request"): self.abort_request,
        }

    @staticmethod
    def _null(action: Callable[[], None]) -> Callable[[dict], None]:
        """SGLang's memory endpoints return nothing on success (FastAPI sends ``null``)."""
        def handler(body: dict) -> None:
            action()
        return handler

    # ------------------------------------------------------------------ info

    def model_info(self, body: dict) -> dict:
        return {"model_path": self.model_path, "is_generation": True,
                "weight_version": str(self.engine.weight_version)}

    def server_info(self, body: dict) -> dict:
        return {"model_path": self.model_path, "tp_size": 1, "dp_size": 1,
                "weight_version": str(self.engine.weight_version), "engine": "tapo-native"}

    def health_generate(self, body: dict) -> dict:
        with self._weights_lock:
            self.engine.generate([[0]], SamplingParams(temperature=0.0, max_new_tokens=1))
        return {"success": True}

    def flush_cache(self, body: dict) -> "TextReply":
        self.engine.flush_cache()
        return TextReply("Cache flushed.\nPlease check backend logs for more details. (When there are running or "
                         "waiting requests, the operation will not be performed.)\n")

    def abort_request(self, body: dict) -> dict:
        # Generation here is one synchronous call per request; nothing queued can be dropped. Logged so retries
        # after a client time-out are visible.
        logger.info("abort requested rid=%s", body.get("rid"))
        return {"success": True, "message": ""}

    # ------------------------------------------------------------------ generation

    def generate(self, body: dict) -> list[dict] | dict:
        """Serve a GenerateReqInput given as token ids (single prompt or a batch)."""
        input_ids = body.get("input_ids")
        if input_ids is None:
            raise RequestError("generate: input_ids is required (this server does not tokenize text)")
        single = bool(input_ids) and isinstance(input_ids[0], int)
        prompts: list[list[int]] = [input_ids] if single else input_ids
        n = len(prompts)
        rids = _per_prompt(body.get("rid"), n, "rid")
        sampling = _per_prompt(body.get("sampling_params") or {}, n, "sampling_params")
        if any({k: v for k, v in s.items() if k != "sampling_seed"} !=
               {k: v for k, v in sampling[0].items() if k != "sampling_seed"} for s in sampling):
            raise RequestError("generate: per-prompt sampling_params must agree except for sampling_seed")
        params = _sampling_params(sampling[0])
        logger.info("received rids=%s", ",".join(map(str, rids)))
        return_logprob = _per_prompt(body.get("return_logprob", False), n, "return_logprob")[0]
        start_len = _per_prompt(body.get("logprob_start_len", -1), n, "logprob_start_len")[0]
        if self.generate_delay_s > 0:
            time.sleep(self.generate_delay_s)
        with self._weights_lock:
            version = self.engine.weight_version
            generations = self.engine.generate(prompts, params)
            prompt_logprobs = (self._prompt_logprobs(prompts) if return_logprob and start_len is not None
                               and start_len >= 0 else None)
        outputs = []
        for i, (rid, gen) in enumerate(zip(rids, generations)):
            if gen.finish_reason == FinishReason.STOP:
                finish = {"type": "stop", "matched": gen.token_ids[-1]}
            else:
                finish = {"type": "length", "length": len(gen.token_ids)}
            meta: dict[str, Any] = {
                "id": rid, "finish_reason": finish, "prompt_tokens": len(prompts[i]),
                "completion_tokens": len(gen.token_ids), "cached_tokens": 0, "weight_version": str(version),
            }
            if return_logprob:
                meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(gen.logprobs, gen.token_ids)]
                if prompt_logprobs is not None:
                    start = max(0, start_len)
                    meta["input_token_logprobs"] = [[lp, tok, None] for lp, tok in
                                                    zip(prompt_logprobs[i][start:], prompts[i][start:])]
            outputs.append({"text": "", "output_ids": gen.token_ids, "meta_info": meta})
            logger.info("served rid=%s tokens=%d version=%d", rid, len(gen.token_ids), version)
        return outputs[0] if single else outputs

    def _prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """log p(prompt_t | prompt_<t) per prompt token (None for the first), fp32: SGLang's input_token_logprobs."""
        out = []
        with torch.inference_mode():
            for prompt in prompts:
                ids = torch.tensor([prompt], device=self.engine.device)
                logits = self.engine.model(input_ids=ids).logits[0].float()  # [T, V]
                lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
                out.append([None] + lp.tolist())
        return out

    # ------------------------------------------------------------------ weights

    def pause_generation(self, body: dict) -> dict:
        """Start of a weight sync. Generation is not held (updates are atomic here, so requests keep seeing the
        previous weights); the answer is SGLang's."""
        return {"message": "Generation paused successfully.", "status": "ok"}

    def _drop_stage(self) -> None:
        with self._stage_lock:
            dropped = len(self._transaction.staged)
            self._transaction = _Transaction()
        if dropped:
            logger.warning("dropped %d staged tensor(s) of an unfinished weight sync", dropped)

    def begin_weight_update(self, body: dict) -> dict:
        """Open the session (SGLang ``SchedulerWeightUpdaterManager.begin_weight_update``: refused while one is
        open); drops any partial stage a failed earlier sync left behind."""
        if self._session_open:
            return {"success": False,
                    "message": "a weight-update session is already open; call end_weight_update() first"}
        self._drop_stage()
        self._session_open = True
        return {"success": True, "message": "Success"}

    def end_weight_update(self, body: dict) -> dict:
        """Close the session (SGLang ``end_weight_update``); the stage waits for ``/update_weight_version``."""
        if not self._session_open:
            return {"success": False,
                    "message": "no weight-update session is open; call begin_weight_update() first"}
        self._session_open = False
        return {"success": True, "message": "Success"}

    def init_weights_update_group(self, body: dict) -> dict:
        from tapo_megatron.parallel.update_group import init_weight_update_group

        name = _required(body, "group_name")
        if name in self._groups:
            raise RequestError(f"init_weights_update_group: group {name!r} already exists; destroy it first")
        group = init_weight_update_group(
            master_address=_required(body, "master_address"), master_port=int(_required(body, "master_port")),
            rank=int(_required(body, "rank_offset")), world_size=int(_required(body, "world_size")),
            group_name=name, backend=body.get("backend") or "gloo")
        self._groups[name] = group
        self._drop_stage()
        return {"success": True, "message": f"joined weight update group {name}"}

    def destroy_weights_update_group(self, body: dict) -> dict:
        from tapo_megatron.parallel.update_group import destroy_weight_update_group

        name = _required(body, "group_name")
        group = self._groups.pop(name, None)
        if group is None:
            return {"success": False, "message": f"no weight update group named {name!r}"}
        destroy_weight_update_group(group)
        self._drop_stage()
        return {"success": True, "message": ""}

    def update_weights_from_distributed(self, body: dict) -> dict:
        """Receive one announced bucket by broadcast from group rank 0 and stage it. As SGLang: refused outside a
        session (``SchedulerWeightUpdaterManager.update_weights_from_distributed``, same message);
        ``load_format="flattened_bucket"``: one buffer laid out by ``FlattenedTensorBucket.empty``, one broadcast."""
        if not self._session_open:
            return {"success": False, "message": "update_weights_from_distributed must run between "
                                                 "begin_weight_update() and end_weight_update()"}
        names, dtypes, shapes = (_required(body, k) for k in ("names", "dtypes", "shapes"))
        if not len(names) == len(dtypes) == len(shapes):
            raise RequestError(f"update_weights_from_distributed: names/dtypes/shapes lengths differ "
                               f"({len(names)}/{len(dtypes)}/{len(shapes)})")
        name = _required(body, "group_name")
        group = self._groups.get(name)
        if group is None:
            raise RequestError(f"update_weights_from_distributed: unknown group_name {name!r}; "
                               f"call /init_weights_update_group first")
        torch_dtypes = [parse_dtype(d) for d in dtypes]
        if body.get("load_format") == "flattened_bucket":
            flat = empty_flat_bucket(names, torch_dtypes, shapes)
            torch.distributed.broadcast(flat.flat, src=0, group=group)
            received = unflatten(flat)
        else:
            received = []
            for tensor_name, dtype, shape in zip(names, torch_dtypes, shapes):
                tensor = torch.empty(tuple(shape), dtype=dtype)
                torch.distributed.broadcast(tensor, src=0, group=group)  # every announced tensor, even a bad one
                received.append((tensor_name, tensor))
        with self._stage_lock:
            if any(n in self._transaction.staged for n, _ in received):
                # The same name twice means a new sync restarted after an unfinished one: start a fresh stage.
                logger.warning("tensor sent again before a commit: dropping the previous unfinished stage")
                self._transaction = _Transaction()
            self._transaction.staged.update(received)
        if body.get("weight_version") is not None:
            return self.update_weight_version({"new_version": body["weight_version"]})
        return {"success": True, "message": "Succeeded to update parameter online."}

    def update_weight_version(self, body: dict) -> dict:
        """Commit the staged tensors (if any) atomically and set the served version."""
        version = _version(_required(body, "new_version"))
        with self._stage_lock:
            staged, self._transaction = self._transaction.staged, _Transaction()
        with self._weights_lock:
            if staged:
                try:
                    self.engine.update_weights([list(staged.items())], version, owned=True)  # received here
                except WeightUpdateError as err:
                    return {"success": False, "message": f"weight update refused, still serving version "
                                                         f"{self.engine.weight_version}: {err}"}
            else:
                self.engine._version = version  # a pure relabel, as SGLang's endpoint does
        return {"success": True, "message": f"Weight version updated to {version}", "new_version": str(version)}

    def update_weights_from_disk(self, body: dict) -> dict:
        """Load an HF checkpoint folder atomically (all tensors validated, then applied)."""
        from tapo_megatron.convert.hf_io import HFCheckpointReader

        path = Path(_required(body, "model_path"))
        version = body.get("weight_version")
        reader = HFCheckpointReader(path)
        try:
            with self._weights_lock:
                target = _version(version) if version is not None else self.engine.weight_version
                try:
                    self.engine.update_weights(([(name, reader[name])] for name in reader), target)
                except WeightUpdateError as err:
                    return {"success": False, "message": f"{path}: {err}"}
        finally:
            reader.close()
        return {"success": True, "message": f"loaded {path}", "num_paused_requests": 0}

    def get_weights_by_name(self, body: dict) -> list[float]:
        name = _required(body, "name")
        specs = self.engine.weight_specs
        if name not in specs:
            raise RequestError(f"get_weights_by_name: unknown weight {name!r}")
        truncate = int(body.get("truncate_size", 100))
        with self._weights_lock:
            values = dict(self.engine.model.named_parameters(remove_duplicate=False))[name]
            return values.detach().float().flatten()[:truncate].tolist()


def _required(body: dict, key: str) -> Any:
    if key not in body or body[key] is None:
        raise RequestError(f"request body is missing {key!r}")
    return body[key]


def _version(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RequestError(f"weight version {value!r} is not an integer (tapo versions are optimizer steps)") from None


def _per_prompt(value: Any, n: int, name: str) -> list:
    """SGLang batch fields are either one value for all prompts or a list with one per prompt."""
    if isinstance(value, list) and name != "input_ids":
        if len(value) != n:
            raise RequestError(f"generate: {name} has {len(value)} entries for {n} prompts")
        return value
    return [value] * n


def _sampling_params(s: dict) -> SamplingParams:
    known = {"temperature", "top_p", "max_new_tokens", "stop_token_ids", "sampling_seed", "skip_special_tokens",
             "no_stop_trim", "ignore_eos", "n"}
    unknown = sorted(set(s) - known)
    if unknown:
        raise RequestError(f"generate: sampling_params {unknown} are not supported by the native engine server")
    if s.get("n", 1) != 1:
        raise RequestError("generate: sampling_params.n must be 1 (send one prompt per sample)")
    return SamplingParams(
        temperature=float(s.get("temperature", 1.0)), top_p=float(s.get("top_p", 1.0)),
        max_new_tokens=int(s.get("max_new_tokens", 128)), stop_token_ids=tuple(s.get("stop_token_ids") or ()),
        seed=s.get("sampling_seed"))


def _handler_class(server: NativeEngineServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _dispatch(self, method: str) -> None:
            route = server.routes.get((method, self.path.split("?")[0]))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if route is None:
                self._reply(HTTPStatus.NOT_FOUND, {"success": False, "message": f"no route {method} {self.path}"})
                return
            try:
                body = json.loads(raw) if raw else {}
                self._reply(HTTPStatus.OK, route(body))
            except (RequestError, ValueError, json.JSONDecodeError) as err:
                self._reply(HTTPStatus.BAD_REQUEST, {"success": False, "message": str(err)})
            except Exception as err:  # noqa: BLE001 - report any handler failure to the client, keep serving
                logger.exception("handler %s %s failed", method, self.path)
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"success": False, "message": repr(err)})

        def _reply(self, status: HTTPStatus, payload: Any) -> None:
            if isinstance(payload, dict) and payload.get("success") is False and status == HTTPStatus.OK:
                status = HTTPStatus.BAD_REQUEST  # SGLang answers a refused weight update with 400
            text = isinstance(payload, TextReply)
            data = payload.text.encode() if text else (b"" if payload is None and self.path.startswith("/health")
                                                      else json.dumps(payload).encode())
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug("%s " + fmt, self.address_string(), *args)

    return Handler


def serve(server: NativeEngineServer, host: str, port: int) -> ThreadingHTTPServer:
    """Bind the HTTP front end (raises OSError when the port is taken) without serving yet."""
    httpd = ThreadingHTTPServer((host, port), _handler_class(server))
    httpd.daemon_threads = True
    return httpd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True, help="HF model folder (config.json [+ safetensors])")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--seed", type=int, default=0, help="init seed when the folder holds no weights")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--generate-delay-s", type=float, default=0.0, help="fault-injection tests only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.num_threads)
    path = Path(args.model_path)
    dtype = parse_dtype(args.dtype)
    if any(path.glob("*.safetensors")):
        engine = NativeEngine.from_pretrained(path, dtype=dtype, seed=args.seed, num_threads=args.num_threads)
    else:
        engine = NativeEngine(json.loads((path / "config.json").read_text()), dtype=dtype, seed=args.seed,
                              num_threads=args.num_threads)
    httpd = serve(NativeEngineServer(engine, str(path), args.generate_delay_s), args.host, args.port)
    logger.info("native engine server ready on http://%s:%d", args.host, args.port)
    sys.stdout.flush()
    httpd.serve_forever()


if __name__ == "__main__":
    main()
