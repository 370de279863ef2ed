"""NativeEngine against independent references: a no-cache full forward of prompt + response (greedy tokens and
log-probs), hand-derived stop/length expectations, the exact truncated sampling distribution, and weight-update
atomicity. Also the HF config helper. Run: ``.venv/bin/python -m pytest tests/test_native_engine.py -q -s``
(``-s`` shows the throughput line)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from tapo_megatron.models.hf_config import hf_config_from_qwen3, qwen3_preset
from tapo_megatron.data.assets import data_file
from tapo_megatron.records import FinishReason, SamplingParams
from tapo_megatron.rollout import NativeEngine, RolloutEngine, WeightUpdateError

TINY = dict(
    vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    max_position_embeddings=128,
)
DEMO = dict(TINY, hidden_size=128, intermediate_size=512, num_hidden_layers=4, head_dim=32, max_position_embeddings=256)
# Different lengths on purpose: the engine left-pads them internally.
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [3, 3, 3, 3, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 31, 30]]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_weights(engine: NativeEngine, seed: int, std: float = 0.3) -> dict[str, torch.Tensor]:
    """Peaked random weights (HF default init gives near-uniform logits, where greedy just repeats one token)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, spec in engine.weight_specs.items():
        if name in ("lm_head.weight",) and engine.config.tie_word_embeddings:
            continue
        if len(spec.shape) == 1:  # norm scales around 1
            weights[name] = 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
        else:
            weights[name] = std * torch.randn(spec.shape, generator=gen)
    return weights


def buckets_of(weights: dict[str, torch.Tensor], size: int = 5) -> list[list[tuple[str, torch.Tensor]]]:
    items = list(weights.items())
    return [items[i : i + size] for i in range(0, len(items), size)]


@pytest.fixture
def engine() -> NativeEngine:
    eng = NativeEngine(TINY, seed=0)
    eng.update_weights(buckets_of(random_weights(eng, seed=1)), version=1)
    return eng


def full_forward_logprobs(engine: NativeEngine, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response_i | prompt, response_<i) from one no-cache, unpadded forward: [len(response), V]."""
    seq = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = engine.model(input_ids=seq, use_cache=False).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) + len(response) - 1]


def reference_greedy(engine: NativeEngine, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding with a full forward per step: no cache, no padding, default positions."""
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


def assert_logprobs_match(engine: NativeEngine, prompts, generations, atol: float = 1e-5) -> None:
    for i, (prompt, gen) in enumerate(zip(prompts, generations)):
        ref = full_forward_logprobs(engine, prompt, gen.token_ids)
        expected = ref.gather(1, torch.tensor(gen.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(gen.logprobs), expected, atol=atol, rtol=0, msg=f"prompt {i}")


# ---------------------------------------------------------------------------------------------- correctness


def test_engine_implements_the_interface(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.weight_version == 1 and engine.health()


def test_greedy_equals_full_forward_argmax_loop_with_mixed_lengths(engine):
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12))
    assert len(out) == len(PROMPTS)
    for prompt, gen in zip(PROMPTS, out):
        assert gen.token_ids == reference_greedy(engine, prompt, 12)
        assert gen.finish_reason is FinishReason.LENGTH and gen.weight_version == 1
    assert len({tuple(g.token_ids) for g in out}) > 1  # weights are peaked enough for distinct answers
    assert_logprobs_match(engine, PROMPTS, out)


def test_equal_length_prompts_take_the_unpadded_path_and_match(engine):
    prompts = [[5, 6, 7, 8], [1, 1, 2, 2], [30, 0, 30, 0]]
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))
    for prompt, gen in zip(prompts, out):
        assert gen.token_ids == reference_greedy(engine, prompt, 8)
    assert_logprobs_match(engine, prompts, out)


def test_sampled_logprobs_are_temperature_one_model_logprobs(engine):
    # Sampling at T=0.7 / top-p 0.9, chunks of 2 rows and stop tokens (rows leave the batch mid-decode): the
    # returned log-probs are still the untruncated T=1 model log-probs of a plain full forward.
    prompts = PROMPTS * 2
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=10, stop_token_ids=(0, 13), seed=3)
    engine.max_batch_size = 4
    out = engine.generate(prompts, params)
    assert any(g.finish_reason is FinishReason.STOP for g in out)
    assert any(g.finish_reason is FinishReason.LENGTH for g in out)
    assert_logprobs_match(engine, prompts, out)


def test_kv_cache_growth_keeps_results_exact(engine, monkeypatch):
    # Start the cache with 2 decode slots so it doubles several times mid-generation (with stops compacting rows).
    import tapo_megatron.rollout.native as native

    params = SamplingParams(temperature=0.9, max_new_tokens=20, stop_token_ids=(7,), seed=9)
    roomy = engine.generate(PROMPTS, params)
    monkeypatch.setattr(native, "_INITIAL_DECODE_SLOTS", 2)
    tight = engine.generate(PROMPTS, params)
    assert [g.token_ids for g in tight] == [g.token_ids for g in roomy]
    assert max(len(g.token_ids) for g in tight) > 8  # the cache really grew (2 -> 4 -> 8 -> 16 slots)
    assert_logprobs_match(engine, PROMPTS, tight)


def test_bfloat16_engine_returns_fp32_logprobs_close_to_full_forward():
    eng = NativeEngine(TINY, dtype=torch.bfloat16)
    eng.update_weights(buckets_of({k: v.bfloat16() for k, v in random_weights(eng, seed=1).items()}), version=1)
    out = eng.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8, seed=0))
    assert all(isinstance(x, float) for g in out for x in g.logprobs)
    assert_logprobs_match(eng, PROMPTS, out, atol=0.1)  # bf16 KV cache vs bf16 full forward: rounding only


def test_stop_token_ends_the_sequence_and_is_included(engine):
    prompt = PROMPTS[1]
    free = reference_greedy(engine, prompt, 12)
    stop = free[4]
    first = free.index(stop)  # the greedy path is unchanged up to the first occurrence of the stop token
    out = engine.generate([prompt, PROMPTS[2]], SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(stop,)))
    assert out[0].token_ids == free[: first + 1]
    assert out[0].finish_reason is FinishReason.STOP
    assert len(out[0].logprobs) == first + 1
    other_free = reference_greedy(engine, PROMPTS[2], 12)
    if stop in other_free:
        assert out[1].token_ids == other_free[: other_free.index(stop) + 1]
    else:
        assert out[1].token_ids == other_free and out[1].finish_reason is FinishReason.LENGTH


def test_sampled_stops_are_well_formed(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=9, stop_token_ids=(4, 13, 24), seed=11)
    out = engine.generate(PROMPTS * 6, params)
    for gen in out:
        if gen.finish_reason is FinishReason.STOP:
            assert gen.token_ids[-1] in params.stop_token_ids
            assert not set(gen.token_ids[:-1]) & set(params.stop_token_ids)
        else:
            assert len(gen.token_ids) == 9 and not set(gen.token_ids) & set(params.stop_token_ids)
    assert {g.finish_reason for g in out} == {FinishReason.STOP, FinishReason.LENGTH}


def test_max_new_tokens_and_context_window(engine):
    out = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=5, seed=0))
    assert [len(g.token_ids) for g in out] == [5] * len(PROMPTS)
    assert all(len(g.logprobs) == 5 and g.finish_reason is FinishReason.LENGTH for g in out)
    # A 125-token prompt in a 128-position model has room for 3 tokens, whatever max_new_tokens says.
    long_prompt = [i % 32 for i in range(125)]
    out = engine.generate([long_prompt, [1, 2]], SamplingParams(temperature=0.0, max_new_tokens=10))
    assert len(out[0].token_ids) == 3 and out[0].finish_reason is FinishReason.LENGTH
    assert out[0].token_ids == reference_greedy(engine, long_prompt, 3)
    assert len(out[1].token_ids) == 10
    with pytest.raises(ValueError, match="prompt 1 has 128 tokens"):
        engine.generate([[1], [0] * 128], SamplingParams(max_new_tokens=1))


def test_tiny_top_p_is_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10))
    for seed in (0, 1, 2):
        nucleus = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10, seed=seed))
        assert [g.token_ids for g in nucleus] == [g.token_ids for g in greedy]
        for a, b in zip(nucleus, greedy):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)


def test_sampling_follows_the_truncated_tempered_distribution(engine):
    # One step from one prompt, 3000 rows: empirical token frequencies vs softmax(logits / T) restricted to the
    # top-p nucleus and renormalised, computed here by hand from a full forward.
    prompt, temperature, top_p, rows = [4, 5, 6], 0.8, 0.7, 3000
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt]), use_cache=False).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, dim=-1)
    order = probs.argsort(descending=True)
    mass_before = torch.cumsum(probs[order], 0) - probs[order]
    nucleus = order[mass_before < top_p]
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert 2 <= len(nucleus) < 32  # the test exercises a real truncation
    out = engine.generate([prompt] * rows, SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=1, seed=5))
    counts = torch.bincount(torch.tensor([g.token_ids[0] for g in out]), minlength=32).double() / rows
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
    assert (counts - expected).abs().max() < 0.035  # ~4 standard errors at 3000 draws


def test_seeded_reproducibility(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=42)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    c = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, seed=43))
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # seed=None draws from the engine's own generator: two engines built with the same seed agree call by call,
    # and successive calls differ.
    other = NativeEngine(TINY, seed=0)
    other.update_weights(buckets_of(random_weights(other, seed=1)), version=1)
    free = SamplingParams(temperature=1.0, max_new_tokens=10)
    first, second = engine.generate(PROMPTS, free), engine.generate(PROMPTS, free)
    assert [g.token_ids for g in first] == [g.token_ids for g in other.generate(PROMPTS, free)]
    assert [g.token_ids for g in first] != [g.token_ids for g in second]


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = NativeEngine(TINY, seed=7), NativeEngine(TINY, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name


def test_num_threads_is_restored(engine):
    engine.num_threads = 2
    torch.set_num_threads(1)
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, seed=0))
    assert torch.get_num_threads() == 1


def test_invalid_requests_name_the_field(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="prompt 0 has token id 32"):
        engine.generate([[1, 32]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1]], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1]], SamplingParams(temperature=-1.0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1]], SamplingParams(max_new_tokens=0))
    assert engine.generate([], SamplingParams()) == []


# ---------------------------------------------------------------------------------------------- weights


def snapshot(engine: NativeEngine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.model.named_parameters()}


def assert_same_weights(engine: NativeEngine, before: dict[str, torch.Tensor]) -> None:
    for name, p in engine.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_update_weights_applies_all_tensors_and_bumps_version(engine):
    new = random_weights(engine, seed=2)
    engine.update_weights(buckets_of(new, size=3), version=7)
    assert engine.weight_version == 7
    params = dict(engine.model.named_parameters())
    for name, tensor in new.items():
        assert torch.equal(params[name], tensor), name
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight  # tying survives the copy
    out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, seed=0))
    assert out[0].weight_version == 7


def test_stream_failing_halfway_leaves_previous_weights_and_version(engine):
    before, greedy_before = snapshot(engine), engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    new_buckets = buckets_of(random_weights(engine, seed=2), size=3)

    def broken_stream():
        yield from new_buckets[: len(new_buckets) // 2]
        raise ConnectionError("sender died")

    with pytest.raises(ConnectionError, match="sender died"):
        engine.update_weights(broken_stream(), version=2)
    assert engine.weight_version == 1
    assert_same_weights(engine, before)
    greedy_after = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert [g.token_ids for g in greedy_after] == [g.token_ids for g in greedy_before]
    assert all(g.weight_version == 1 for g in greedy_after)


def test_bad_tensors_are_refused_by_name_and_nothing_is_applied(engine):
    before = snapshot(engine)
    good = random_weights(engine, seed=2)
    name = "model.layers.1.self_attn.k_proj.weight"
    cases = {
        "shape": ({**good, name: torch.zeros(3, 3)}, rf"{name}.*shape \(3, 3\)"),
        "dtype": ({**good, name: good[name].double()}, rf"{name}.*dtype torch.float64"),
        "unknown": ({**good, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)}, r"model.layers.9.mlp.up_proj.weight.*unknown"),
        "missing": ({k: v for k, v in good.items() if k != name}, rf"without 1 tensor\(s\): {name}"),
    }
    for case, (weights, pattern) in cases.items():
        with pytest.raises(WeightUpdateError, match=pattern):
            engine.update_weights(buckets_of(weights), version=5)
        assert engine.weight_version == 1, case
        assert_same_weights(engine, before)
    # After a bad tensor the rest of the stream is still drained (a collective sender must reach its end).
    consumed = []

    def counting(buckets):
        for bucket in buckets:
            consumed.append(len(bucket))
            yield bucket

    bad = buckets_of({**good, "model.embed_tokens.weight": torch.zeros(2)}, size=4)  # first tensor of the stream
    with pytest.raises(WeightUpdateError, match=r"'model.embed_tokens.weight' \(bucket 0\).*shape"):
        engine.update_weights(counting(bad), version=5)
    assert len(consumed) == len(bad) > 1
    with pytest.raises(WeightUpdateError, match="sent twice"):
        engine.update_weights([[(name, good[name])], list(good.items())], version=5)
    assert_same_weights(engine, before)


def test_tied_lm_head_may_be_sent_but_must_match(engine):
    good = random_weights(engine, seed=2)
    embed = good["model.embed_tokens.weight"]
    engine.update_weights(buckets_of({**good, "lm_head.weight": embed.clone()}), version=3)
    assert engine.weight_version == 3
    before = snapshot(engine)
    with pytest.raises(WeightUpdateError, match="'lm_head.weight' is tied"):
        engine.update_weights(buckets_of({**random_weights(engine, seed=4), "lm_head.weight": embed + 1}), version=4)
    assert engine.weight_version == 3
    assert_same_weights(engine, before)


def test_untied_model_requires_lm_head():
    eng = NativeEngine(dict(TINY, tie_word_embeddings=False))
    weights = random_weights(eng, seed=0)
    assert "lm_head.weight" in weights and "lm_head.weight" in eng.weight_specs
    with pytest.raises(WeightUpdateError, match="lm_head.weight"):
        eng.update_weights(buckets_of({k: v for k, v in weights.items() if k != "lm_head.weight"}), version=1)
    eng.update_weights(buckets_of(weights), version=1)
    assert torch.equal(eng.model.lm_head.weight, weights["lm_head.weight"])


def test_lifecycle_release_resume_shutdown(engine):
    engine.flush_cache()
    engine.release_memory()
    assert engine.health()  # paused, not dead
    with pytest.raises(RuntimeError, match="release_memory"):
        engine.generate([[1]], SamplingParams())
    engine.resume_memory()
    assert engine.health() and len(engine.generate([[1]], SamplingParams(max_new_tokens=2))[0].token_ids) == 2
    engine.shutdown()
    assert not engine.health()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate([[1]], SamplingParams())


def test_from_pretrained_round_trip(engine, tmp_path):
    engine.model.save_pretrained(tmp_path)
    loaded = NativeEngine.from_pretrained(tmp_path)
    assert loaded.weight_version == 0
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    assert [g.token_ids for g in loaded.generate(PROMPTS, params)] == [g.token_ids for g in engine.generate(PROMPTS, params)]
    with pytest.raises(FileNotFoundError, match="config.json"):
        NativeEngine.from_pretrained(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------- config helper


def test_hf_config_from_presets_and_dicts():
    cfg = hf_config_from_qwen3(qwen3_preset("Qwen3-0.6B"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.vocab_size) == (1024, 28, 128, 151936)
    assert cfg.tie_word_embeddings and cfg.rope_parameters["rope_theta"] == 1_000_000
    entry = json.loads((data_file("qwen3_configs.json")).read_text())["models"]["Qwen3-8B"]
    cfg8 = hf_config_from_qwen3(entry)  # the {"config": ..., "source": ...} wrapper is unwrapped
    assert (cfg8.hidden_size, cfg8.num_key_value_heads, cfg8.tie_word_embeddings) == (4096, 8, False)
    tiny = hf_config_from_qwen3(TINY, attn_implementation="eager")
    assert (tiny.head_dim, tiny.rope_parameters["rope_theta"], tiny._attn_implementation) == (16, 10000.0, "eager")
    assert hf_config_from_qwen3(tiny.to_dict()).rope_parameters["rope_theta"] == 10000.0  # round trip
    no_head_dim = {k: v for k, v in TINY.items() if k != "head_dim"}
    assert hf_config_from_qwen3(no_head_dim).head_dim == 64 // 4  # hidden / heads, not Qwen3Config's 128
    with pytest.raises(ValueError, match="missing required field\\(s\\): num_key_value_heads"):
        hf_config_from_qwen3({k: v for k, v in TINY.items() if k != "num_key_value_heads"})
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        hf_config_from_qwen3(dict(TINY, num_key_value_heads=3))
    with pytest.raises(ValueError, match="rope_scaling"):
        hf_config_from_qwen3(dict(TINY, rope_scaling={"type": "yarn", "factor": 4.0}))
    with pytest.raises(KeyError, match="Qwen3-0.6B"):
        qwen3_preset("Qwen3-70B")


def test_sdpa_and_eager_engines_agree():
    sdpa = NativeEngine(TINY, attn_implementation="sdpa")
    eager = NativeEngine(TINY, attn_implementation="eager")
    weights = random_weights(sdpa, seed=1)
    sdpa.update_weights(buckets_of(weights), 1)
    eager.update_weights(buckets_of(weights), 1)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    a, b = sdpa.generate(PROMPTS, params), eager.generate(PROMPTS, params)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


# ---------------------------------------------------------------------------------------------- batch size


def test_demo_model_batch_b128_one_thread():
    """B=128 on the demo-sized model, 1 thread, 16-token prompts, 32 new tokens, no stop: every row gets them all.
    Throughput is a benchmark, not a test: ``tapo bench engine`` (tok/s against HF ``generate``)."""
    eng = NativeEngine(DEMO, num_threads=1)
    eng.update_weights(buckets_of(random_weights(eng, seed=0, std=0.15)), version=1)
    prompts = torch.randint(0, 32, (128, 16), generator=torch.Generator().manual_seed(0)).tolist()
    out = eng.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=32, seed=0))
    assert sum(len(g.token_ids) for g in out) == 128 * 32
    assert all(g.weight_version == 1 and len(g.logprobs) == 32 for g in out)
