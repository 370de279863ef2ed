"""SGLang contract checks: run INSIDE the sglang venv (``make venv-sglang``), by tests/test_sglang_contract.py.

    .venv-sglang/bin/python -m pytest -q tests/_sync_sglang_contract.py

Every HTTP body ``rollout.sglang`` sends is validated the way SGLang's HTTP server validates it: pydantic over the
request class from ``sglang.srt.managers.io_struct`` (what FastAPI does for ``Annotated[Cls, Body()]``), plus a
check that no key is unknown to the class (an unknown key would be silently dropped by the server). The launch argv
goes through ``sglang.srt.server_args.prepare_server_args``. The colocated flattened-bucket payload is decoded with
SGLang's own deserializer and bucket class and must rebuild the tensors bit-exactly.
"""
import base64
import dataclasses
import json

import msgspec
import pydantic
import pytest
import torch
from sglang.srt.managers import io_struct
from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

from tapo_megatron.records import SamplingParams
from tapo_megatron.rollout import sglang as adapter
from tapo_megatron.rollout.buckets import flatten_by_dtype, flatten_for_broadcast
from tapo_megatron.rollout.sglang import serialize_flat_bucket


def _fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(cls.__struct_fields__)


def validate(cls, payload: dict):
    """Parse ``payload`` (after a JSON round trip, as on the wire) as SGLang's server would; refuse unknown keys."""
    wire = json.loads(json.dumps(payload))
    unknown = set(wire) - _fields(cls)
    assert not unknown, f"{cls.__name__} has no field(s) {sorted(unknown)}"
    return pydantic.TypeAdapter(cls).validate_python(wire)


def test_generate_payload_is_a_valid_batch_generate_request():
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, stop_token_ids=(5, 2, 5), seed=None)
    payload = adapter.generate_payload([[1, 2, 3], [4, 5]], params, ["r0", "r1"], seeds=[10, 11])
    req = validate(io_struct.GenerateReqInput, payload)
    req.normalize_batch_and_arguments()
    assert req.batch_size == 2 and not req.is_single
    assert req.input_ids == [[1, 2, 3], [4, 5]] and req.rid == ["r0", "r1"]
    assert req.return_logprob in (True, [True, True]) and req.stream is False
    for sp, seed in zip(payload["sampling_params"], (10, 11)):
        parsed = SGLSamplingParams(**sp)
        parsed.verify(vocab_size=32)
        assert parsed.temperature == 0.7 and parsed.top_p == 0.9 and parsed.max_new_tokens == 12
        assert parsed.stop_token_ids == {2, 5} and parsed.sampling_seed == seed and parsed.no_stop_trim is True


def test_probe_payload_asks_for_prompt_logprobs_from_position_zero():
    payload = adapter.generate_payload([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=1), ["p"],
                                       prompt_logprobs=True)
    req = validate(io_struct.GenerateReqInput, payload)
    req.normalize_batch_and_arguments()
    assert req.logprob_start_len in (0, [0])
    SGLSamplingParams(**payload["sampling_params"][0]).verify(vocab_size=32)


def test_weight_update_group_and_distributed_payloads():
    init = validate(io_struct.InitWeightsUpdateGroupReqInput,
                    adapter.init_group_payload("10.0.0.1", 29500, 1, 3, "tapo-pp0", "nccl"))
    assert (init.master_address, init.master_port, init.rank_offset, init.world_size, init.group_name,
            init.backend) == ("10.0.0.1", 29500, 1, 3, "tapo-pp0", "nccl")
    bucket = [("model.embed_tokens.weight", torch.zeros(8, 4, dtype=torch.bfloat16)),
              ("model.norm.weight", torch.zeros(4))]
    mid = validate(io_struct.UpdateWeightsFromDistributedReqInput,
                   adapter.update_distributed_payload(flatten_for_broadcast(bucket), "tapo-pp0"))
    # Largest element size first, so SGLang's receive buffer has every tensor aligned.
    assert mid.names == ["model.norm.weight", "model.embed_tokens.weight"] and mid.shapes == [[4], [8, 4]]
    assert mid.weight_version is None and mid.flush_cache is False and mid.group_name == "tapo-pp0"
    assert mid.load_format == "flattened_bucket"
    # SGLang's receiver turns dtype strings back with getattr(torch, dtype): they must round-trip.
    assert [getattr(torch, d) for d in mid.dtypes] == [torch.float32, torch.bfloat16]
    validate(io_struct.BeginWeightUpdateReqInput, adapter.begin_payload())
    validate(io_struct.EndWeightUpdateReqInput, adapter.end_payload())
    commit = validate(io_struct.UpdateWeightVersionReqInput, adapter.weight_version_payload(7))
    assert commit.new_version == "7" and commit.abort_all_requests is False
    validate(io_struct.DestroyWeightsUpdateGroupReqInput, {"group_name": "tapo-pp0"})


def test_lifecycle_payloads():
    disk = validate(io_struct.UpdateWeightFromDiskReqInput, adapter.update_disk_payload("/ckpt/v3", 3))
    assert disk.model_path == "/ckpt/v3" and disk.weight_version == "3" and disk.flush_cache is True
    assert validate(io_struct.PauseGenerationReqInput, adapter.pause_payload()).mode == "abort"
    validate(io_struct.ContinueGenerationReqInput, {})
    assert validate(io_struct.ReleaseMemoryOccupationReqInput, adapter.memory_payload()).tags is None
    assert validate(io_struct.ResumeMemoryOccupationReqInput, adapter.memory_payload(["weights"])).tags == ["weights"]
    abort = validate(io_struct.AbortReq, adapter.abort_payload("tapo-3-7-a0-abc"))
    assert abort.rid == "tapo-3-7-a0-abc" and abort.abort_all is False
    got = validate(io_struct.GetWeightsByNameReqInput, adapter.weights_by_name_payload("model.norm.weight", 5))
    assert got.name == "model.norm.weight" and got.truncate_size == 5


def test_flattened_bucket_tensor_payload_decodes_with_sglang():
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    g = torch.Generator().manual_seed(0)
    bucket = [("a", torch.randn(3, 4, generator=g)), ("b", torch.randn(6, generator=g).to(torch.bfloat16)),
              ("c", torch.randn(5, generator=g))]
    for flat in flatten_by_dtype(bucket):
        serialized = serialize_flat_bucket(flat)
        req = validate(io_struct.UpdateWeightsFromTensorReqInput,
                       adapter.update_tensor_payload([serialized, serialized]))
        assert req.load_format == "flattened_bucket" and req.weight_version is None and req.flush_cache is False
        assert len(req.serialized_named_tensors) == 2  # one per engine TP rank
        raw = req.serialized_named_tensors[0]
        raw = raw if isinstance(raw, bytes) else base64.b64decode(raw)
        data = MultiprocessingSerializer.deserialize(raw)
        rebuilt = dict(FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"],
                                             metadata=data["metadata"]).reconstruct_tensors())
        for name, tensor in bucket:
            if tensor.dtype == flat.dtype:
                assert torch.equal(rebuilt[name], tensor), name


def test_server_argv_parses_with_sglang(tmp_path):
    from sglang.srt.server_args import prepare_server_args

    argv = adapter.sglang_server_argv("/models/qwen3", tp_size=2, mem_fraction_static=0.6, enable_memory_saver=True,
                                      random_seed=5, extra={"context_length": 4096, "disable_radix_cache": True,
                                                            "log_level": None})
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    filled = [a.replace("{host}", "127.0.0.1").replace("{port}", "31000") for a in argv[3:]]
    args = prepare_server_args(filled)
    assert (args.model_path, args.host, args.port, args.tp_size) == ("/models/qwen3", "127.0.0.1", 31000, 2)
    assert args.mem_fraction_static == 0.6 and args.enable_memory_saver and args.random_seed == 5
    assert args.context_length == 4096 and args.disable_radix_cache and args.skip_server_warmup


def test_an_unknown_field_is_caught_by_the_checker():
    # The checker itself must fail on a misspelt key (otherwise the tests above prove nothing).
    with pytest.raises(AssertionError, match="weight_versoin"):
        validate(io_struct.UpdateWeightVersionReqInput, {"new_version": "1", "weight_versoin": "1"})
    with pytest.raises((pydantic.ValidationError, msgspec.ValidationError, TypeError)):
        validate(io_struct.InitWeightsUpdateGroupReqInput, {"master_address": "x", "master_port": "not-a-port",
                                                             "rank_offset": 1, "world_size": 2})


# ---------------------------------------------------------------------------------------------- SGLang's own rules
# The adapter and the trainer's transports against SGLang's own HTTP handlers and weight-update managers
# (tests/_sglang_control_plane.py says exactly which parts are SGLang's code and which are stubs).

SHAPES = {"model.embed_tokens.weight": ((6, 4), torch.bfloat16), "model.norm.weight": ((4,), torch.float32),
          "lm_head.weight": ((6, 4), torch.float32)}


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, (shape, dtype) in SHAPES.items()}


@pytest.fixture
def plane():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _sglang_control_plane import ControlPlane

    p = ControlPlane(SHAPES)
    yield p
    p.close()


def _engine(url: str):
    return adapter.SGLangEngine.connect([url], world_sizes=[1], startup_timeout_s=10, request_timeout_s=60)


def _ctx():
    from tapo_megatron.parallel import ParallelContext

    return ParallelContext(device=torch.device("cpu"), backend="gloo", world_size=1, rank=0, tp_size=1, pp_size=1,
                           dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0, tp_group=None, pp_group=None, dp_group=None,
                           mp_group=None)


def test_distributed_sync_is_accepted_by_sglang_session_rules(plane, monkeypatch):
    """The trainer's DistributedWeightSync, unchanged, against SGLang's scheduler-side manager: if it skipped the
    session SGLang would refuse every bucket (and the broadcast would time out), so this test fails."""
    from tapo_megatron.training.weight_sync import distributed as distributed_module

    weights = _weights(1)
    buckets = [[("model.embed_tokens.weight", weights["model.embed_tokens.weight"]),
                ("model.norm.weight", weights["model.norm.weight"])], [("lm_head.weight", weights["lm_head.weight"])]]
    monkeypatch.setattr(distributed_module, "export_hf_weights", lambda model, ctx, nbytes: iter(buckets))
    _allow_same_group_twice(monkeypatch)
    engine = _engine(plane.url)
    sync = distributed_module.DistributedWeightSync(None, _ctx(), engine, 1 << 20, backend="gloo",
                                                    group_timeout_s=20)
    try:
        sync.connect()
        stats = sync.sync(3)
    finally:
        sync.disconnect()
        engine.shutdown()
    for name, tensor in weights.items():
        assert torch.equal(plane.model.weight(name), tensor), name
    calls = plane.tokenizer_manager.calls
    assert calls[calls.index("pause"):] == ["pause", "begin", "distributed", "distributed", "end", "version", "flush",
                                            "continue", "destroy_group"]
    assert plane.manager._session is None and plane.scheduler.weight_version == "3" and plane.scheduler.flushes == 1
    assert engine.weight_version == 3 and stats.num_tensors == 3 and len(stats.bucket_bytes) == 2


def test_an_update_outside_a_session_is_refused_by_sglang(plane):
    engine = _engine(plane.url)
    flat = flatten_for_broadcast([("model.norm.weight", torch.ones(4))])
    with pytest.raises(adapter.EngineError, match=r"must run between begin_weight_update\(\) and end_weight_upd"):
        engine.update_weights_from_distributed(flat, "g", 1, send=lambda: None)  # no broadcast: refused first
    # The colocated path with the session step removed is refused the same way, and names the version.
    engine.begin_weight_update = lambda version: engine.pause_generation()
    with pytest.raises(adapter.EngineError, match=r"version 2.*update_weights_from_tensor must run between"):
        engine.update_weights_from_tensor([[("model.norm.weight", torch.ones(4))]], 2)
    assert plane.model.loaded == [] and plane.scheduler.weight_version == "default"
    engine.shutdown()


def test_tensor_sync_through_sglang_flattened_bucket_loader(plane):
    """update_weights_from_tensor: one session, SGLang's deserializer and flattened-bucket loader on CPU tensors."""
    engine = _engine(plane.url)
    weights = _weights(2)
    engine.update_weights_from_tensor([list(weights.items())], 5)
    for name, tensor in weights.items():
        assert torch.equal(plane.model.weight(name), tensor), name
    assert plane.scheduler.weight_version == "5" and engine.weight_version == 5 and plane.manager._session is None
    # A second session cannot open while one is open: SGLang's message reaches the caller.
    engine.servers[0].post("/begin_weight_update", adapter.begin_payload())
    with pytest.raises(adapter.EngineError, match="already open"):
        engine.servers[0].post("/begin_weight_update", adapter.begin_payload())
    # A session left open (a trainer died mid-sync) is closed by the next sync, which then completes.
    engine.update_weights_from_tensor([list(_weights(4).items())], 8)
    assert plane.scheduler.weight_version == "8" and plane.manager._session is None
    engine.shutdown()


def test_response_shapes_as_sglang_writes_them(plane):
    status, ctype, body = plane.call("/flush_cache", None)
    assert status == 200 and "json" not in ctype and body.startswith(b"Cache flushed.")
    assert adapter.parse_response(body, ctype).startswith("Cache flushed.")
    plane.scheduler.idle = False
    status, ctype, body = plane.call("/flush_cache", None)
    assert status == 400 and adapter.parse_response(body, ctype).startswith("Flush cache failed")
    with pytest.raises(adapter.EngineError, match="HTTP 400: Flush cache failed"):
        adapter.EngineServer(url=plane.url).post("/flush_cache")
    plane.scheduler.idle = True
    status, ctype, body = plane.call("/release_memory_occupation", adapter.memory_payload())
    assert (status, body) == (200, b"null") and adapter.parse_response(body, ctype) is None
    status, ctype, body = plane.call("/pause_generation", adapter.pause_payload())
    assert adapter.parse_response(body, ctype) == {"message": "Generation paused successfully.", "status": "ok"}
    status, ctype, body = plane.call("/end_weight_update", adapter.end_payload())
    assert status == 400 and adapter.parse_response(body, ctype)["success"] is False


def test_release_and_resume_memory_through_sglang(plane):
    from sglang.srt.constants import GPU_MEMORY_ALL_TYPES

    engine = _engine(plane.url)
    metrics = engine.release_memory()
    assert sorted(plane.saver.paused) == sorted(GPU_MEMORY_ALL_TYPES) and metrics["engine/release_seconds"] >= 0
    engine.resume_memory()
    assert plane.saver.paused == [] and plane.tokenizer_manager.calls[-1] == "continue"
    engine.shutdown()


def _allow_same_group_twice(monkeypatch):
    """Trainer and "engine" share this process, so torch would refuse the second registration of the group name
    (separate processes in real use): keep the first, as both sides name the same group."""
    from torch.distributed import distributed_c10d as c10d

    register = c10d._register_process_group

    def register_once(name, pg):
        try:
            register(name, pg)
        except RuntimeError as err:
            if "already registered" not in str(err):
                raise

    monkeypatch.setattr(c10d, "_register_process_group", register_once)


def test_an_engine_error_mid_sync_leaves_it_paused_and_named(plane, monkeypatch):
    """SGLang's load_weights_from_distributed answers a failed load with success=false ("partially updated"): the
    sync fails naming the version, the session is closed, and the engine refuses to generate (still paused) until
    a sync completes."""
    from tapo_megatron.training.weight_sync import distributed as distributed_module

    _allow_same_group_twice(monkeypatch)
    weights = _weights(3)
    buckets = [[("model.norm.weight", weights["model.norm.weight"])], [("lm_head.weight", weights["lm_head.weight"])],
               [("model.embed_tokens.weight", weights["model.embed_tokens.weight"])]]
    monkeypatch.setattr(distributed_module, "export_hf_weights", lambda model, ctx, nbytes: iter(buckets))
    real = plane.model.load_weights

    def fail_lm_head(named):
        named = list(named)
        if any(name == "lm_head.weight" for name, _ in named):
            raise RuntimeError("injected load failure")
        real(named)

    plane.model.load_weights = fail_lm_head
    engine = _engine(plane.url)
    sync = distributed_module.DistributedWeightSync(None, _ctx(), engine, 1 << 20, backend="gloo", group_timeout_s=20)
    try:
        sync.connect()
        with pytest.raises(Exception, match=r"version 6 failed.*engine 0 .*injected load failure") as info:
            sync.sync(6)
        assert type(info.value).__name__ == "WeightSyncError"
        assert plane.manager._session is None and plane.scheduler.weight_version == "default"
        assert "continue" not in plane.tokenizer_manager.calls  # still paused
        with pytest.raises(adapter.EngineError, match="partial weight update to version 6"):
            engine.generate([[1, 2]], SamplingParams(temperature=0.0, max_new_tokens=1))
        plane.model.load_weights = real
        sync.sync(7)  # a complete sync resumes it
        assert plane.scheduler.weight_version == "7" and plane.tokenizer_manager.calls[-1] == "continue"
    finally:
        sync.disconnect()
        engine.shutdown()


def test_colocated_launch_argv_pins_gpus_and_parses_with_sglang():
    from sglang.srt.server_args import prepare_server_args

    from tapo_megatron.config import LaunchConfig, RolloutConfig
    from tapo_megatron.rollout.build import sglang_launches

    rollout = RolloutConfig(engine="sglang", engine_model_path="/models/qwen3")
    launches = sglang_launches(rollout, 7, LaunchConfig(engine_placement="colocated", engine_tp=2), num_gpus=4,
                               mem_fraction=0.31)
    assert [spec.world_size for spec in launches] == [2, 2]
    for i, spec in enumerate(launches):
        args = prepare_server_args([a.replace("{host}", "127.0.0.1").replace("{port}", "31000")
                                    for a in spec.argv[3:]])
        assert (args.tp_size, args.base_gpu_id, args.mem_fraction_static) == (2, 2 * i, 0.31)
        assert args.enable_memory_saver and args.enable_deterministic_inference and args.random_seed == 7
        # /server_info is build_server_info(server_args) = resolved_dict() + scheduler info: the keys
        # SGLangEngine.connect reads (tp_size, and enable_deterministic_inference when seeds must hold)
        from sglang.srt.utils.common import build_server_info

        info = build_server_info(args, {})
        assert info["enable_deterministic_inference"] is True and info["tp_size"] == 2
