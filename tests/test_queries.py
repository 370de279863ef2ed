"""Query-file loading (bad rows with file:line, limit, shuffle, real data files) and the tokenizer wrappers."""
from __future__ import annotations

import json
import logging
import os

import pytest

from tapo_megatron.errors import ConfigError
from tapo_megatron.data.queries import BadRow, DataError, load_queries
from tapo_megatron.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from tapo_megatron.data.assets import data_file, qwen3_tokenizer_dir
from tapo_megatron.tasks.arithmetic import ArithmeticTask, ArithmeticTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _row(**fields) -> bytes:
    return (json.dumps(fields) + "\n").encode()


@pytest.fixture()
def messy_file(tmp_path):
    """A file with one bad row of each kind; the comments give the 1-based line numbers."""
    lines = [
        _row(id="q1", problem="What is 1+1?", answer="2", source="hand"),  # 1 good
        b'{"id": "q2", "problem": "broken\n',  # 2 not JSON
        b'{"id": "q3", "problem": "caf\xe9", "answer": "1"}\n',  # 3 latin-1 byte, not UTF-8
        _row(id="q4", answer="3"),  # 4 missing problem
        _row(id="q5", problem="2+3?", answer="  "),  # 5 empty answer
        _row(id="q1", problem="Duplicate id", answer="0"),  # 6 duplicate of line 1
        b"[1, 2, 3]\n",  # 7 not an object
        b"   \n",  # 8 blank: no row
        _row(id=9, problem="Numeric answer and id", answer=42, solution="It is 42."),  # 9 good
        _row(problem="No id", answer="x"),  # 10 good, id from file stem and line
        _row(id="q11", problem=["not", "text"], answer="1"),  # 11 problem of the wrong type
    ]
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def test_bad_rows_are_skipped_and_reported_with_line_numbers(messy_file, caplog):
    with caplog.at_level(logging.WARNING, logger="tapo_megatron.data.queries"):
        qf = load_queries(messy_file)
    assert qf.ids == ["q1", "9", "messy-10"]
    assert [q.answer for q in qf] == ["2", "42", "x"]
    assert [q.source for q in qf] == ["hand", "messy", "messy"]
    assert qf.solutions == {"9": "It is 42."}
    assert all(q.prompt_ids == [] for q in qf)
    assert [b.line for b in qf.bad_rows] == [2, 3, 4, 5, 6, 7, 11]
    reasons = [b.reason for b in qf.bad_rows]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1].startswith("not valid UTF-8")
    assert reasons[2] == "missing field 'problem'"
    assert reasons[3] == "empty field 'answer'"
    assert reasons[4] == "duplicate id 'q1' (first seen at line 1)"
    assert reasons[5] == "expected a JSON object, got list"
    assert reasons[6] == "field 'problem' must be a string, got list"
    assert str(qf.bad_rows[4]) == f"{messy_file}:6: duplicate id 'q1' (first seen at line 1)"
    assert all(b.path == messy_file for b in qf.bad_rows)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 7 bad row(s) of 10" in warnings[0] and f"{messy_file}:2:" in warnings[0]


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"{not json}\n", "not valid JSON"),
        (b'{"id": "a", "problem": "\xff", "answer": "1"}\n', "not valid UTF-8"),
        (_row(id="a", answer="1"), "missing field 'problem'"),
        (_row(id="a", problem="p", answer=""), "empty field 'answer'"),
        (_row(id="q0", problem="p", answer="1"), "duplicate id 'q0' (first seen at line 1)"),
    ],
)
def test_raise_mode_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(_row(id="q0", problem="ok", answer="1") + line)
    with pytest.raises(DataError) as info:
        load_queries(path, on_error="raise")
    assert str(info.value).startswith(f"{path}:2: {reason}")
    assert info.value.bad_row == BadRow(path, 2, info.value.bad_row.reason)
    assert len(load_queries(path).bad_rows) == 1  # the same row, skipped


def test_limit_shuffle_and_prompt_builder(tmp_path):
    path = tmp_path / "ten.jsonl"
    path.write_bytes(b"".join(_row(id=f"q{i}", problem=f"{i}+1", answer=str(i + 1)) for i in range(10)) + b"oops\n")
    limited = load_queries(path, limit=3)
    assert limited.ids == ["q0", "q1", "q2"]
    assert [b.line for b in limited.bad_rows] == [11]  # rows past the limit are still validated
    full = load_queries(path)
    shuffled = full.shuffle(seed=0)
    assert shuffled.ids == full.shuffle(seed=0).ids
    assert sorted(shuffled.ids) == sorted(full.ids) and shuffled.ids != full.ids
    assert shuffled.ids != full.shuffle(seed=1).ids
    assert full.ids == [f"q{i}" for i in range(10)]  # shuffle returns a new object
    tok = ArithmeticTokenizer()
    with_prompts = load_queries(path, tokenizer=tok)
    assert with_prompts[3].prompt_ids == tok.encode("3+1>")
    padded = load_queries(path, prompt_builder=ArithmeticTask().prompt_ids)
    assert padded[3].prompt_ids == [0] * 11 + tok.encode("3+1>")
    with pytest.raises(ValueError, match="either tokenizer or prompt_builder"):
        load_queries(path, tokenizer=tok, prompt_builder=tok.encode)
    with pytest.raises(ValueError, match="on_error"):
        load_queries(path, on_error="ignore")
    with pytest.raises(FileNotFoundError):
        load_queries(tmp_path / "absent.jsonl")


# -- real files ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen() -> HFTokenizer:
    tok = load_tokenizer(qwen3_tokenizer_dir())
    assert isinstance(tok, HFTokenizer)
    return tok


def test_aime2024(qwen):
    qf = load_queries(data_file("aime2024.jsonl"), on_error="raise", tokenizer=qwen)
    assert len(qf) == 30 and not qf.bad_rows
    assert qf.ids[0] == "aime2024-I-01" and qf.ids[-1] == "aime2024-II-15"
    assert qf[0].answer == "204" and qf[1].answer == "25"  # from the file's first rows (README: official answers)
    assert all(q.answer.isdigit() for q in qf)
    first = qf[0]
    assert first.prompt_ids[:3] == [151644, 872, 198]  # <|im_start|>user\n
    assert first.prompt_ids[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]
    assert qwen.decode(first.prompt_ids).startswith("user\nEvery morning Aya goes for a $9$-kilometer-long walk")


def test_deepscaler_sample():
    qf = load_queries(data_file("deepscaler_sample.jsonl"), on_error="raise")
    assert len(qf) == 2769 and not qf.bad_rows
    assert len(qf.solutions) == 781  # README: the Meta-Reason rows carry solutions, the other 1,988 have null
    assert qf[0].id == "deepscaler-mr-0000" and qf[0].answer == "-\\frac{2}{3}"
    assert qf.solutions["deepscaler-mr-0000"].startswith("1. **Apply the operation $\\otimes$")
    assert len(set(qf.ids)) == 2769


# -- tokenizers ------------------------------------------------------------------------------------------------------


def test_qwen_tokenizer_wrapper(qwen):
    assert isinstance(qwen, Tokenizer)
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.decode([9707, 1879]) == "Hello world"
    assert (qwen.eos_id, qwen.pad_id, qwen.vocab_size) == (151645, 151643, 151669)
    ids = qwen.chat_prompt_ids("What is 1+1?")
    assert qwen.decode(ids, skip_special=False) == (
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert ids[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]
    thinking = qwen.chat_prompt_ids("What is 1+1?", system="Be brief.", enable_thinking=True)
    assert qwen.decode(thinking, skip_special=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen.encode("<|im_end|>") == [151645]


def test_load_tokenizer_arithmetic_and_errors(tmp_path):
    tok = ArithmeticTokenizer()  # the arithmetic task's own (tasks.arithmetic.tokenizer)
    assert isinstance(tok, Tokenizer)
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        load_tokenizer("Qwen/Qwen3-8B")
    with pytest.raises(ValueError, match="no system prompt"):
        tok.chat_prompt_ids("1+2", system="hi")
