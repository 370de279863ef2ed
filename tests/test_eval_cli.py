"""``tapo eval`` on the real AIME24 file: a tiny random Qwen3 (real 151,936 vocabulary) from an HF directory and from
its Megatron checkpoint, a scripted engine with hand-computed Pass@k / DSR / ERR, summaries checked against the
per-sample files, ``--compare``, and bad benchmark rows."""
import json
import math
import shutil

import pytest
import torch
import transformers

from tapo_megatron.evaluation import benchmarks as eval_cli
from tapo_megatron.rollout.policy import PolicySource
from tapo_megatron.commands import main
from tapo_megatron.data.assets import data_file, qwen3_tokenizer_dir
from tapo_megatron.records import FinishReason, Generation
from tapo_megatron.rewards import extract_boxed, math_reward
from tapo_megatron.rollout.base import RolloutEngine

TOKENIZER = qwen3_tokenizer_dir()
AIME = [json.loads(line) for line in open(data_file("aime2024.jsonl"), encoding="utf-8")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("model") / "tiny-qwen3"
    config = transformers.Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      tie_word_embeddings=True, max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)
    for f in TOKENIZER.iterdir():  # an HF dir ships its tokenizer: `tapo eval` needs no --tokenizer for it
        shutil.copy(f, path / f.name)
    return path


def _samples(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _pass_at_k(n, c, k):  # independent of algorithms.metrics: the definition, with exact binomials
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _check_summary_against_samples(summary: dict, samples: list[dict], n: int) -> None:
    gold = {r["id"]: r["answer"] for r in AIME}
    per_problem: dict[str, list[bool]] = {}
    for s in samples:
        assert s["extracted_answer"] == extract_boxed(s["response"])
        assert s["correct"] == (math_reward(s["response"], gold[s["query_id"]]) == 1.0)
        per_problem.setdefault(s["query_id"], []).append(s["correct"])
    assert all(len(v) == n for v in per_problem.values()) and summary["num_problems"] == len(per_problem)
    for k in (1, 2, 4, 8, 16):
        if k > n:
            assert f"pass@{k}" not in summary
            continue
        want = sum(_pass_at_k(n, sum(v), k) for v in per_problem.values()) / len(per_problem)
        assert summary[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
    correct = [s for s in samples if s["correct"]]
    reflective = [s for s in samples if s["reflective"]]
    dsr = sum(not s["reflective"] for s in correct) / len(correct) if correct else math.nan
    err = sum(s["correct"] for s in reflective) / len(reflective) if reflective else math.nan
    for key, want in (("dsr", dsr), ("err", err)):
        assert (math.isnan(summary[key]) and math.isnan(want)) or summary[key] == pytest.approx(want)


def test_tiny_model_hf_dir_and_megatron_checkpoint(tmp_path, hf_dir):
    args = ["--benchmarks", "aime24", "--limit", "3", "--n", "4", "--max-new-tokens", "6", "--temperature", "1.0",
            "--top-p", "0.95", "--seed", "3"]
    assert main(["eval", "--model", str(hf_dir), "--out", str(tmp_path / "hf"), "--label", "hf", *args]) == 0
    summary = json.loads((tmp_path / "hf" / "summary.json").read_text())
    samples = _samples(tmp_path / "hf" / "aime24.samples.jsonl")
    assert sorted({s["query_id"] for s in samples}) == sorted(r["id"] for r in AIME[:3]) and len(samples) == 12
    assert all(1 <= s["num_tokens"] <= 6 for s in samples)
    _check_summary_against_samples(summary["benchmarks"]["aime24"], samples, n=4)
    assert summary["settings"]["temperature"] == 1.0 and summary["model_version"].startswith("sha256:")
    assert (tmp_path / "hf" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| hf | aime24 | 3 | 4 |" in (tmp_path / "hf" / "summary.md").read_text()

    # The same weights as a Megatron checkpoint: converted on load, same samples with the same seed.
    from tapo_megatron.convert.api import hf_to_mcore

    hf_to_mcore(hf_dir, tmp_path / "ckpt")
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "mc"), "--label", "mcore",
                 *args]) == 0
    mc_samples = _samples(tmp_path / "mc" / "aime24.samples.jsonl")
    assert [s["response"] for s in mc_samples] == [s["response"] for s in samples]

    assert main(["eval", "--compare", str(tmp_path / "hf"), str(tmp_path / "mc"), "--out",
                 str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| hf | aime24 |" in table and "| mcore | aime24 |" in table
    assert (tmp_path / "cmp" / "compare_aime24.png").is_file()


class ScriptedEngine(RolloutEngine):
    """Per problem, the j-th of the n samples in one call follows PLAN[problem][j]."""

    PLAN = [["right", "right-reflective", "wrong-reflective", "wrong"],
            ["wrong", "wrong", "wrong-reflective", "wrong"],
            ["right", "right", "right", "right"]]

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, prompts, params):
        seen, out = {}, []
        for p in prompts:
            text = self.tok.decode(p)
            i = next(i for i, r in enumerate(AIME[:3]) if r["problem"] in text)
            j = seen[i] = seen.get(i, -1) + 1
            kind = self.PLAN[i][j]
            answer = AIME[i]["answer"] if kind.startswith("right") else "1"
            body = "We compute. Wait, let me re-check the sum. " if kind.endswith("reflective") else "We compute. "
            ids = self.tok.encode(f"{body}The answer is $\\boxed{{{answer}}}$.") + [self.tok.eos_id]
            out.append(Generation(ids, [0.0] * len(ids), FinishReason.STOP, 0))
        return out

    def update_weights(self, buckets, version):
        raise RuntimeError("scripted engine has no weights")

    weight_version = property(lambda self: 0)

    def flush_cache(self): pass

    def release_memory(self): pass

    def resume_memory(self): pass

    def shutdown(self): pass

    def prompt_logprobs(self, tokens):
        raise AssertionError("a scripted engine has no model to score prompts with")

    def health(self): return True


def test_scripted_metrics_match_hand_computed(tmp_path):
    from tapo_megatron.data.tokenizer import load_tokenizer

    policy = PolicySource(ScriptedEngine(load_tokenizer(TOKENIZER)), "scripted", "v1", TOKENIZER)
    settings = eval_cli.EvalSettings(n_samples=4, limit=3, max_new_tokens=32)
    summary = eval_cli.run_eval(None, ["aime24"], tmp_path / "s", settings, policy=policy)["benchmarks"]["aime24"]
    # correct per problem: 2, 0, 4 of 4; reflective: 2, 1, 0 (1 of them correct)
    assert summary["pass@1"] == pytest.approx((2 / 4 + 0 + 1) / 3)
    assert summary["pass@2"] == pytest.approx(((1 - 1 / 6) + 0 + 1) / 3)
    assert summary["pass@4"] == pytest.approx((1 + 0 + 1) / 3)
    assert summary["dsr"] == pytest.approx(5 / 6)  # 6 correct, 5 without reflection
    assert summary["err"] == pytest.approx(1 / 3)  # 3 reflective, 1 correct
    samples = _samples(tmp_path / "s" / "aime24.samples.jsonl")
    _check_summary_against_samples(summary, samples, n=4)
    first = sorted((s["sample"], s["extracted_answer"]) for s in samples if s["query_id"] == AIME[0]["id"])
    assert first == [(0, AIME[0]["answer"]), (1, AIME[0]["answer"]), (2, "1"), (3, "1")]


def test_bad_benchmark_rows_skipped_or_refused(tmp_path, capsys):
    bench = tmp_path / "mini.jsonl"
    lines = [json.dumps(AIME[0]), json.dumps({"id": "b1", "problem": "No answer here."}),
             json.dumps({**AIME[1], "answer": "\\text{}"}), json.dumps(AIME[0])]
    bench.write_text("\n".join(lines) + "\n")
    from tapo_megatron.data.tokenizer import load_tokenizer

    policy = PolicySource(ScriptedEngine(load_tokenizer(TOKENIZER)), "scripted", "v1", TOKENIZER)
    out = eval_cli.run_eval(None, [str(bench)], tmp_path / "s", eval_cli.EvalSettings(n_samples=1), policy=policy)
    assert out["benchmarks"]["mini"]["bad_rows"] == [
        f"{bench}:2: missing field 'answer'",
        f"{bench}:3: gold answer '\\\\text{{}}': the math verifier cannot parse it",
        f"{bench}:4: duplicate id 'aime2024-I-01' (first seen at line 1)"]
    assert out["benchmarks"]["mini"]["num_problems"] == 1
    assert f"skipped bad row {bench}:2" in capsys.readouterr().out
    with pytest.raises(ValueError, match=rf"{bench}:2: missing field 'answer'"):
        eval_cli.run_eval(None, [str(bench)], tmp_path / "r", eval_cli.EvalSettings(n_samples=1, on_bad_row="raise"),
                          policy=policy)
