"""SGLang 0.5.23's own weight-update control plane on CPU, behind a real socket (runs in ``.venv-sglang`` only).

What is SGLang's code here, unchanged:
* the HTTP handler functions of ``sglang.srt.entrypoints.http_server`` (``/begin_weight_update``,
  ``/end_weight_update``, ``/update_weights_from_distributed``, ``/update_weights_from_tensor``,
  ``/init_weights_update_group``, ``/destroy_weights_update_group``, ``/update_weight_version``, ``/flush_cache``,
  ``/pause_generation``, ``/continue_generation``, ``/release_memory_occupation``, ``/resume_memory_occupation``,
  ``/abort_request``): read from the installed source with ``ast`` and executed with starlette's ``Response``
  (FastAPI and uvicorn are not installed in that environment, so the FastAPI decorators are dropped);
* the request classes (``io_struct``), parsed with pydantic as FastAPI does for ``Annotated[Cls, Body()]``;
* the scheduler-side ``SchedulerWeightUpdaterManager`` (the session rules: no update outside a session) and the
  model-runner ``WeightUpdater`` (group creation with ``init_custom_process_group``, the flattened-bucket receive,
  ``begin/end_weight_update``), driving a stub model whose ``load_weights`` copies tensors in.

Stubs (ours, marked): the tokenizer manager (it forwards each request to the manager, as
``tokenizer_control_mixin`` does through its communicators, and returns ``(success, message)``), the scheduler
(version record, idle flag, cache flush), the TP worker, the memory saver, ``get_parallel`` (one gloo TP group),
``/health_generate`` and ``/model_info`` (generation is not part of this plane), ``sglang.srt.lora.layers`` (its
import needs einops, absent there; the loader only uses its ``BaseLayerWithLoRA`` class for an ``isinstance``), and
the receiver's ``monkey_patch_torch_reductions`` (see ``_deserialize_own_rank``), and ``torch.get_device_module``
(CPU: nothing to synchronize).
"""
from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import json
import sys
import threading
import types
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any

import orjson
import pydantic
import torch
import torch.distributed as dist
from starlette.responses import JSONResponse, Response

if "sglang.srt.lora.layers" not in sys.modules:  # see module docstring
    _lora = types.ModuleType("sglang.srt.lora.layers")
    _lora.BaseLayerWithLoRA = type("BaseLayerWithLoRA", (torch.nn.Module,), {})
    sys.modules["sglang.srt.lora.layers"] = _lora

import sglang.srt.managers.scheduler_components.weight_updater as sched_wu  # noqa: E402
import sglang.srt.model_executor.model_runner_components.weight_updater as runner_wu  # noqa: E402
from sglang.srt.managers import io_struct  # noqa: E402


class ORJSONResponse(JSONResponse):
    """FastAPI's ``fastapi.responses.ORJSONResponse`` (same media type and rendering)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


ROUTES = {  # path -> (SGLang handler name, request class)
    "/begin_weight_update": ("begin_weight_update", io_struct.BeginWeightUpdateReqInput),
    "/end_weight_update": ("end_weight_update", io_struct.EndWeightUpdateReqInput),
    "/update_weights_from_distributed": ("update_weights_from_distributed",
                                         io_struct.UpdateWeightsFromDistributedReqInput),
    "/update_weights_from_tensor": ("update_weights_from_tensor", io_struct.UpdateWeightsFromTensorReqInput),
    "/init_weights_update_group": ("init_weights_update_group", io_struct.InitWeightsUpdateGroupReqInput),
    "/destroy_weights_update_group": ("destroy_weights_update_group", io_struct.DestroyWeightsUpdateGroupReqInput),
    "/update_weight_version": ("update_weight_version", io_struct.UpdateWeightVersionReqInput),
    "/flush_cache": ("flush_cache", None),
    "/pause_generation": ("pause_generation", io_struct.PauseGenerationReqInput),
    "/continue_generation": ("continue_generation", io_struct.ContinueGenerationReqInput),
    "/release_memory_occupation": ("release_memory_occupation", io_struct.ReleaseMemoryOccupationReqInput),
    "/resume_memory_occupation": ("resume_memory_occupation", io_struct.ResumeMemoryOccupationReqInput),
    "/abort_request": ("abort_request", io_struct.AbortReq),
}


def sglang_handlers(global_state) -> dict[str, Any]:
    """SGLang's handler functions, compiled from the installed http_server.py without their FastAPI decorators."""
    path = Path(importlib.util.find_spec("sglang.srt.entrypoints.http_server").origin)  # found, not imported
    tree = ast.parse(path.read_text())
    wanted = {name for name, _ in ROUTES.values()} | {"_create_error_response"}
    defs = [node for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in wanted]
    for node in defs:
        node.decorator_list = []
    namespace = {"_global_state": global_state, "ORJSONResponse": ORJSONResponse, "Response": Response,
                 "HTTPStatus": HTTPStatus, "Annotated": Annotated, "Body": lambda *a, **k: None,
                 "Query": lambda default, **k: default, "Request": Any, "Any": Any,
                 **{n: getattr(io_struct, n) for n in dir(io_struct) if n[0].isupper()}}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    missing = wanted - set(namespace)
    assert not missing, f"SGLang 0.5.23 http_server.py has no {sorted(missing)}"
    return namespace


class StubModel(torch.nn.Module):
    """Named parameters plus SGLang's model ``load_weights(iterable of (name, tensor))`` contract."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        self.names = list(shapes)
        for i, (name, (shape, dtype)) in enumerate(shapes.items()):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False))
        self.loaded: list[str] = []

    def weight(self, name: str) -> torch.Tensor:
        return getattr(self, f"p{self.names.index(name)}")

    def load_weights(self, weights) -> None:
        for name, tensor in weights:
            self.weight(name).data.copy_(tensor)
            self.loaded.append(name)


class StubScheduler:
    def __init__(self):
        self.weight_version = "default"
        self.idle = True
        self.flushes = 0
        self._engine_paused = False
        self.disaggregation_mode = None

    def record_weight_version_change(self, new_version):  # Scheduler.record_weight_version_change, minus the reqs
        if new_version is not None:
            self.weight_version = new_version

    def flush_cache(self, empty_cache: bool = True) -> bool:
        if self.idle:
            self.flushes += 1
        return self.idle

    def is_fully_idle(self, ignore_waiting: bool = False) -> bool:
        return self.idle


class StubTokenizerManager:
    """Forwards to SGLang's manager as the tokenizer manager's communicators do; records the pause state."""

    def __init__(self, manager, scheduler: StubScheduler):
        self.manager, self.scheduler = manager, scheduler
        self.is_pause = False
        self.calls: list[str] = []

    def _pair(self, name, out):
        self.calls.append(name)
        return out.success, out.message

    async def begin_weight_update(self, obj, request=None):
        return self._pair("begin", self.manager.begin_weight_update(obj))

    async def end_weight_update(self, obj, request=None):
        return self._pair("end", self.manager.end_weight_update(obj))

    async def update_weights_from_distributed(self, obj, request=None):
        return self._pair("distributed", self.manager.update_weights_from_distributed(obj))

    async def update_weights_from_tensor(self, obj, request=None):
        return self._pair("tensor", self.manager.update_weights_from_tensor(obj))

    async def init_weights_update_group(self, obj, request=None):
        return self._pair("init_group", self.manager.init_weights_update_group(obj))

    async def destroy_weights_update_group(self, obj, request=None):
        return self._pair("destroy_group", self.manager.destroy_weights_update_group(obj))

    async def update_weight_version(self, obj):
        self.calls.append("version")
        self.scheduler.record_weight_version_change(obj.new_version)

    async def flush_cache(self, timeout_s=None):
        self.calls.append("flush")
        ok = self.scheduler.flush_cache()
        return io_struct.FlushCacheReqOutput(success=ok, message="" if ok else "Flush cache failed.\n")

    async def pause_generation(self, obj):
        self.calls.append("pause")
        self.is_pause = self.scheduler._engine_paused = True

    async def continue_generation(self, obj):
        self.calls.append("continue")
        self.is_pause = self.scheduler._engine_paused = False

    async def release_memory_occupation(self, obj, request=None):
        self.calls.append("release")
        self.manager.release_memory_occupation(obj)

    async def resume_memory_occupation(self, obj, request=None):
        self.calls.append("resume")
        self.manager.resume_memory_occupation(obj)

    def abort_request(self, rid=None, abort_all=False):
        self.calls.append("abort")


class StubMemorySaver:
    def __init__(self):
        self.paused: list[str] = []

    def pause(self, tag):
        self.paused.append(tag)

    def resume(self, tag):
        self.paused.remove(tag)


def _ensure_default_group() -> dist.ProcessGroup:
    """A one-rank gloo world: SGLang's WeightUpdater asserts a default group, the manager barriers on its TP
    CPU group."""
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return dist.group.WORLD


class ControlPlane:
    """One SGLang 'server' (TP 1): SGLang's handlers -> stub tokenizer manager -> SGLang's weight-update manager ->
    SGLang's model-runner WeightUpdater -> ``StubModel``. ``url`` is a real HTTP endpoint."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        group = _ensure_default_group()
        parallel = types.SimpleNamespace(tp_group=types.SimpleNamespace(cpu_group=group), tp_rank=0, dp_size=1)
        sched_wu.get_parallel = lambda: parallel  # noqa: E731 - stub: one TP rank
        weight_cache = types.SimpleNamespace(weight_cache_mode="off")
        runner_wu.get_model = lambda: weight_cache  # runtime_context.get_model: only weight_cache_mode is read
        sched_wu.get_model = runner_wu.get_model
        if not torch.cuda.is_available():  # a CUDA build without a GPU would pick torch.cuda for the synchronize
            torch.get_device_module = lambda device=None: torch.cpu
        runner_wu.monkey_patch_torch_reductions = lambda: None  # see _deserialize_own_rank
        self.model = StubModel(shapes)
        self.updater = runner_wu.WeightUpdater(
            tp_rank=0, device="cpu", gpu_id=0, model_config=None, custom_weight_loaders={},
            get_model=lambda: self.model, update_model_fields=lambda *a, **k: None,
            recapture_cuda_graph=lambda: None, get_model_runner=lambda: None)
        runner = types.SimpleNamespace(weight_updater=self.updater, model=self.model)
        tp_worker = types.SimpleNamespace(
            model_runner=runner, weight_update_runners=lambda: [("target", runner)],
            init_weights_update_group=lambda req: self.updater.init_weights_update_group(
                req.master_address, req.master_port, req.rank_offset, req.world_size, req.group_name, req.backend),
            destroy_weights_update_group=lambda req: self.updater.destroy_weights_update_group(req.group_name),
            deserialize_own_rank=lambda payloads: _deserialize_own_rank(payloads))
        self.scheduler = StubScheduler()
        self.saver = StubMemorySaver()
        self.manager = sched_wu.SchedulerWeightUpdaterManager(
            tp_worker=tp_worker, draft_worker=None, memory_saver_adapter=self.saver,
            flush_cache=self.scheduler.flush_cache, is_fully_idle=self.scheduler.is_fully_idle,
            scheduler=self.scheduler)
        self.tokenizer_manager = StubTokenizerManager(self.manager, self.scheduler)
        self.handlers = sglang_handlers(types.SimpleNamespace(tokenizer_manager=self.tokenizer_manager))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def call(self, path: str, body: dict | None) -> tuple[int, str, bytes]:
        """One request through SGLang's handler: (status, content type, body bytes) as the client sees them."""
        name, cls = ROUTES[path]
        handler = self.handlers[name]
        kwargs: dict[str, Any] = {}
        params = inspect.signature(handler).parameters
        if "obj" in params:
            try:  # what FastAPI does with Annotated[Cls, Body()]: validate, or answer 422
                kwargs["obj"] = pydantic.TypeAdapter(cls).validate_python(body or {})
            except pydantic.ValidationError as err:
                return 422, "application/json", json.dumps({"detail": str(err)}).encode()
        if "request" in params:
            kwargs["request"] = None
        response = asyncio.run(handler(**kwargs))
        if response is None:  # FastAPI serializes a handler's None as a JSON null with 200
            return 200, "application/json", b"null"
        return response.status_code, response.headers.get("content-type", ""), bytes(response.body)


def _deserialize_own_rank(serialized_named_tensors):
    """``TpModelWorker.deserialize_own_rank`` for TP rank 0, without its ``monkey_patch_torch_reductions()``: the
    patch rewrites the CUDA tensor reduction globally, and here sender and receiver share one process with CPU
    tensors, whose pickling the patched reduction cannot handle (index 6 of a CPU reduction does not exist)."""
    from sglang.srt.utils import MultiprocessingSerializer

    return MultiprocessingSerializer.deserialize(serialized_named_tensors[0])


def _handler(plane: ControlPlane):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _do(self) -> None:
            path = self.path.split("?")[0]
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path in ("/health", "/health_generate"):  # stub: generation is not part of this plane
                status, ctype, data = 200, "", b""
            elif path == "/model_info":  # stub of model_info(): the field the client reads
                status, ctype = 200, "application/json"
                data = json.dumps({"weight_version": plane.scheduler.weight_version}).encode()
            elif path in ROUTES:
                status, ctype, data = plane.call(path, json.loads(raw) if raw.strip() else None)
            else:
                status, ctype, data = 404, "application/json", b'{"detail":"Not Found"}'
            self.send_response(status)
            if ctype:
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _do  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    return Handler
