"""``tapo coldstart build`` on a slice of the real DeepScaleR file with the real Qwen3 tokenizer.

A scripted engine (it reads the problem out of each prompt) makes exactly c of K rollouts correct per query, with the
hand-chosen counts below, and answers construction prompts with a reconstruction that copies the wrong solution up to
its faulty step; one query's constructions come back without tags. So the ZPD filter, the pairing, the construction
parser, the splice and the verifier all run for real and every count is known in advance. A tiny random-init Qwen3
(real vocabulary, hidden 32) then runs the same build end to end through the CLI: its garbage answers are all wrong,
so the ZPD filter drops every query and only the instruction-following set is written.
"""
import json
import shutil

import pytest
import torch

from tapo_megatron import coldstart
from tapo_megatron.rollout.policy import PolicySource
from tapo_megatron.config import load_config
from tapo_megatron.data.queries import DataError
from tapo_megatron.data.tokenizer import load_tokenizer
from tapo_megatron.data.assets import data_file, qwen3_tokenizer_dir
from tapo_megatron.records import FinishReason, Generation
from tapo_megatron.rewards import extract_boxed, math_reward
from tapo_megatron.rollout.base import RolloutEngine

K = 4
COUNTS = [0, 2, 4, 1, 3, 2]  # correct rollouts of K per query of the slice; 0 and 4 fall outside the ZPD
FAIL_QUERY = 4  # this query's constructions come back without tags (count 3 -> one pair)
M_MAX = 2
WRONG = "12345"
WRONG_STEP = f"Step 1: adding the numbers gives {WRONG}."


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(qwen3_tokenizer_dir())


@pytest.fixture(scope="module")
def slice_rows(tmp_path_factory):
    rows = []
    with open(data_file("deepscaler_sample.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["answer"] != WRONG:
                rows.append(row)
            if len(rows) == len(COUNTS):
                break
    path = tmp_path_factory.mktemp("data") / "slice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


class ScriptedEngine(RolloutEngine):
    """Finds the problem in each decoded prompt; the j-th copy of a problem within one call is correct iff j < c."""

    def __init__(self, tokenizer, rows, fail_after_calls=None):
        self.tok, self.rows = tokenizer, rows
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def _reply(self, text: str, seen: dict) -> str:
        if "## Student's solution (wrong)" in text:
            wrong = text.split("## Student's solution (wrong)\n", 1)[1].split("\n\n## Reference solution", 1)[0]
            i = next(i for i, r in enumerate(self.rows) if r["problem"] in text)
            if i == FAIL_QUERY:
                return "I am not sure what to do here."
            prefix = wrong[:wrong.index(WRONG_STEP) + len(WRONG_STEP)]
            return (f"<analysis>\nStep 1 adds wrongly.\n</analysis>\n<reconstruction>\n{prefix} Wait, that is "
                    f"not right: I added wrongly. Redoing the sum, the answer is $\\boxed{{{self.rows[i]['answer']}}}$."
                    "\n</reconstruction>")
        i = next(i for i, r in enumerate(self.rows) if r["problem"] in text)
        j = seen[i] = seen.get(i, -1) + 1
        if j < COUNTS[i]:
            return f"Let me compute.\nStep 1: the sum is right.\nThe answer is $\\boxed{{{self.rows[i]['answer']}}}$."
        return f"Let me compute.\n{WRONG_STEP}\nSo the answer is $\\boxed{{{WRONG}}}$."

    def generate(self, prompts, params):
        self.calls += 1
        if self.fail_after_calls is not None and self.calls > self.fail_after_calls:
            raise RuntimeError("engine died")
        seen: dict = {}
        out = []
        for p in prompts:
            ids = self.tok.encode(self._reply(self.tok.decode(p), seen)) + [self.tok.eos_id]
            out.append(Generation(ids, [-0.5] * len(ids), FinishReason.STOP, 3))
        return out

    def update_weights(self, buckets, version):
        raise RuntimeError("scripted engine has no weights")  # never called by the cold-start build

    weight_version = property(lambda self: 3)

    def flush_cache(self): pass

    def release_memory(self): pass

    def resume_memory(self): pass

    def shutdown(self): pass

    def prompt_logprobs(self, tokens):
        raise AssertionError("a scripted engine has no model to score prompts with")

    def health(self): return True


def _cfg(data_file, out, **cs):
    overrides = [f"coldstart.query_files=[{data_file}]", f"coldstart.output_dir={out}", "data.reward=math",
                 f"rollout.n_samples_per_prompt={K}", f"tapo.m_max={M_MAX}", "coldstart.chunk_size=2",
                 "coldstart.model_name=scripted-qwen3", "coldstart.model_version=v7", "seed=11",
                 "model.hf_config={vocab_size: 8, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 1, "
                 "num_key_value_heads: 1, head_dim: 8, intermediate_size: 8}"]
    overrides += [f"coldstart.{k}={v}" for k, v in cs.items()]
    return load_config(None, overrides)


def _build(cfg, tokenizer, rows, **engine_kw):
    policy = PolicySource(ScriptedEngine(tokenizer, rows, **engine_kw), "unused", "unused", None)
    return coldstart.build_coldstart(cfg, policy=policy, tokenizer=tokenizer, progress=False)


def _read(out):
    return {kind: coldstart.read_rows(out / coldstart.OUTPUT_FILES[kind]) for kind in coldstart.KINDS}


def test_three_outputs_zpd_and_provenance(tmp_path, tokenizer, slice_rows):
    data_file, rows = slice_rows
    report = _build(_cfg(data_file, tmp_path / "cs"), tokenizer, rows)
    out = _read(tmp_path / "cs")
    in_zpd = {rows[i]["id"] for i, c in enumerate(COUNTS) if 0 < c < K}
    assert report.queries_total == report.queries_done == 6
    assert (report.zpd_kept, report.zpd_all_wrong, report.zpd_all_correct) == (4, 1, 1)
    # Pairs: min(#wrong, m_max) per ZPD query: counts 2, 1, 3, 2 -> 2 + 2 + 1 + 2 = 7; the count-3 query's fails.
    assert report.constructions_attempted == 7
    assert report.failures == {"no_tags": 1}
    assert report.constructions_spliced == 6 and report.constructions_incorrect == 0
    assert report.rows == {"construction_task": 6, "micro_reflective": 6, "instruction_following": 12}

    by_id = {r["id"]: (r, COUNTS[i]) for i, r in enumerate(rows)}
    for kind in ("construction_task", "micro_reflective"):
        assert {r["provenance"]["source_query_id"] for r in out[kind]} == in_zpd - {rows[FAIL_QUERY]["id"]}
    for row in out["construction_task"] + out["micro_reflective"]:
        prov = row["provenance"]
        src, count = by_id[prov["source_query_id"]]
        assert (prov["model"], prov["model_version"], prov["source_file"]) == ("scripted-qwen3", "v7",
                                                                             str(data_file))
        assert prov["method"] == "policy_construction" and prov["details"]["query_accuracy"] == count / K
        assert prov["details"]["prefix_fraction"] == 1.0 and prov["details"]["verified"]
    for row in out["micro_reflective"]:
        src, _ = by_id[row["provenance"]["source_query_id"]]
        assert row["prompt"] == src["problem"]
        assert row["response"].startswith(f"Let me compute.\n{WRONG_STEP} Wait, that is not right")
        assert math_reward(row["response"], src["answer"]) == 1.0
    for row in out["construction_task"]:
        src, _ = by_id[row["provenance"]["source_query_id"]]
        assert src["problem"] in row["prompt"] and WRONG_STEP in row["prompt"]
        body = row["response"].split("<reconstruction>\n", 1)[1].split("\n</reconstruction>", 1)[0]
        assert row["response"].startswith("<analysis>\nStep 1 adds wrongly.\n</analysis>")
        assert extract_boxed(body) == src["answer"]

    # Instruction following: every query (ZPD or not) gives one tag-format and one answer-format row.
    tags = [r for r in out["instruction_following"] if r["subkind"] == "tag_format"]
    answers = [r for r in out["instruction_following"] if r["subkind"] == "answer_format"]
    assert len(tags) == len(answers) == 6
    for row in answers:
        src, _ = by_id[row["provenance"]["source_query_id"]]
        assert row["prompt"] == src["problem"] and row["response"].startswith(src["solution"].rstrip())
        assert math_reward(row["response"], src["answer"]) == 1.0
        assert row["provenance"]["method"] == "gold_solution"
    for row in tags:
        src, _ = by_id[row["provenance"]["source_query_id"]]
        assert src["solution"].rstrip() in row["response"].split("<reconstruction>\n", 1)[1]
        assert src["problem"] in row["prompt"] and "<reconstruction>" in row["prompt"]
    for row in out["instruction_following"]:
        assert (row["provenance"]["model"], row["provenance"]["model_version"]) == ("scripted-qwen3", "v7")
    all_ids = [r["row_id"] for rows_ in out.values() for r in rows_]
    assert len(all_ids) == len(set(all_ids))
    mix = coldstart.read_rows(tmp_path / "cs" / coldstart.MIX_FILE)
    assert sorted(r["row_id"] for r in mix) == sorted(all_ids)


def test_quotas_and_mix_ratios(tmp_path, tokenizer, slice_rows):
    data_file, rows = slice_rows
    report = _build(_cfg(data_file, tmp_path / "cs", num_reflection_examples=4, construction_task_fraction=0.25,
                         num_instruction_examples=3, instruction_tag_fraction=1.0), tokenizer, rows)
    out = _read(tmp_path / "cs")
    assert report.rows == {"construction_task": 1, "micro_reflective": 3, "instruction_following": 3}
    assert {r["subkind"] for r in out["instruction_following"]} == {"tag_format"}
    assert report.stopped_early and report.chunks_done < report.chunks_total  # quotas full before the queries end


def test_killed_build_resumes_without_duplicates(tmp_path, tokenizer, slice_rows, monkeypatch):
    data_file, rows = slice_rows
    _build(_cfg(data_file, tmp_path / "ref"), tokenizer, rows)

    # Kill 1: rows of chunk 1 are appended, then the process dies before the chunk's commit line.
    real_commit = coldstart._commit_progress
    commits = []

    def dying_commit(path, commit):
        if commit["chunk"] == 1:
            raise KeyboardInterrupt("killed")
        commits.append(commit["chunk"])
        real_commit(path, commit)

    monkeypatch.setattr(coldstart, "_commit_progress", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        _build(_cfg(data_file, tmp_path / "cs"), tokenizer, rows)
    assert commits == [0]
    written = sum(len(v) for v in _read(tmp_path / "cs").values())
    committed = sum(json.loads(line)["rows"].get(k, 0) for line in open(tmp_path / "cs" / "progress.jsonl")
                    for k in coldstart.KINDS)
    assert written > committed  # the uncommitted chunk's rows really hit the files
    monkeypatch.setattr(coldstart, "_commit_progress", real_commit)

    # Kill 2: the engine dies in chunk 2 (its 1st call: 2 calls per chunk, chunk 1 redone first).
    with pytest.raises(RuntimeError, match="engine died"):
        _build(_cfg(data_file, tmp_path / "cs"), tokenizer, rows, fail_after_calls=2)
    report = _build(_cfg(data_file, tmp_path / "cs"), tokenizer, rows)
    assert report.chunks_resumed == 2 and report.chunks_done == 3
    for kind, name in coldstart.OUTPUT_FILES.items():
        assert (tmp_path / "cs" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), kind
    ids = [r["row_id"] for rows_ in _read(tmp_path / "cs").values() for r in rows_]
    assert len(ids) == len(set(ids)) == 24

    # A different config in the same output dir is refused, not mixed in.
    with pytest.raises(ValueError, match="different settings"):
        _build(_cfg(data_file, tmp_path / "cs", zpd_low=0.5), tokenizer, rows)


def test_bad_rows_reported_with_file_and_line(tmp_path, tokenizer, slice_rows):
    data_file, rows = slice_rows
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r).encode() for r in rows[:2]]
    lines += [json.dumps({"id": "x1", "problem": "What is 1+1?"}).encode(),                 # line 3: no answer
              json.dumps({"id": "x2", "problem": "Name it.", "answer": "\\text{}"}).encode(),  # line 4: unparsable
              json.dumps(rows[0]).encode(),                                                 # line 5: duplicate id
              b'{"id": "x3", "problem": "\xff\xfe", "answer": "1"}']                         # line 6: not UTF-8
    bad.write_bytes(b"\n".join(lines) + b"\n")
    report = _build(_cfg(bad, tmp_path / "cs"), tokenizer, rows)
    rejected = [json.loads(line) for line in open(tmp_path / "cs" / coldstart.REJECTED_FILE)]
    assert [(r["line"], r["reason"].split(" ")[0]) for r in rejected] == [
        (3, "missing"), (4, "gold"), (5, "duplicate"), (6, "not")]
    assert all(r["path"] == str(bad) for r in rejected)
    assert report.bad_rows == 4 and report.queries_total == 2
    shutil.rmtree(tmp_path / "cs")
    with pytest.raises(DataError, match=rf"{bad}:3: missing field 'answer'"):
        _build(_raise_cfg(bad, tmp_path / "cs"), tokenizer, rows)


def _raise_cfg(data_file, out):
    cfg = _cfg(data_file, out)
    cfg.data.on_bad_row = "raise"
    return cfg


def test_tiny_random_qwen3_through_the_cli(tmp_path, slice_rows):
    """The real engine path: a random-init Qwen3 with the real vocabulary, via ``tapo coldstart build``."""
    from tapo_megatron.commands import main

    torch.set_num_threads(1)
    data_file, rows = slice_rows
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
seed: 3
model:
  tokenizer: {qwen3_tokenizer_dir()}
  hf_config: {{vocab_size: 151936, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
              num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, tie_word_embeddings: true}}
data: {{reward: math}}
rollout: {{n_samples_per_prompt: 2, max_new_tokens: 6, temperature: 1.0}}
tapo: {{max_construction_tokens: 8}}
coldstart:
  query_files: [{data_file}]
  output_dir: {tmp_path / 'cs'}
  max_queries: 3
  chunk_size: 2
""")
    assert main(["coldstart", "build", "--config", str(recipe)]) == 0
    report = json.loads((tmp_path / "cs" / coldstart.REPORT_FILE).read_text())
    assert report["queries_done"] == 3 and report["zpd_all_wrong"] == 3 and report["zpd_kept"] == 0
    assert report["constructions_attempted"] == 0
    out = _read(tmp_path / "cs")
    assert out["construction_task"] == out["micro_reflective"] == []
    assert len(out["instruction_following"]) == 6
    assert {r["provenance"]["source_query_id"] for r in out["instruction_following"]} <= {r["id"] for r in rows}


def test_zpd_filter_of_the_rl_queries(tmp_path, tokenizer, slice_rows):
    """``tapo coldstart filter``: K = 4 scripted samples per query, counts [0, 2, 4, 1, 3, 2] -> the 0/4 and 4/4
    queries leave; the kept rows load as RL queries (``data.train_file``) with their accuracy."""
    from tapo_megatron.data.queries import load_queries

    path, rows = slice_rows
    cfg = _cfg(path, tmp_path / "f", zpd_low=0.25, zpd_high=0.75)
    policy = PolicySource(ScriptedEngine(tokenizer, rows), "unused", "unused", None)
    report = coldstart.filter_queries(cfg, policy=policy, tokenizer=tokenizer, progress=False)
    assert (report.queries, report.kept, report.all_wrong, report.all_correct, report.k) == (6, 4, 1, 1, K)
    assert report.accuracy_histogram == {"0": 1, "1": 1, "2": 2, "3": 1, "4": 1}
    kept = coldstart.read_rows(tmp_path / "f" / coldstart.FILTER_FILE)
    by_problem = {r["problem"]: c for r, c in zip(rows, COUNTS)}
    assert sorted(r["accuracy"] for r in kept) == [0.25, 0.5, 0.5, 0.75]
    assert all(r["accuracy"] == by_problem[r["problem"]] / K for r in kept)
    assert len(load_queries(tmp_path / "f" / coldstart.FILTER_FILE, tokenizer=tokenizer).queries) == 4
    assert json.loads((tmp_path / "f" / coldstart.FILTER_REPORT_FILE).read_text())["kept"] == 4
    with pytest.raises(coldstart.ConfigError, match="coldstart.model_path"):
        coldstart.filter_queries(cfg, tokenizer=tokenizer, progress=False)
