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
