"""``tapo sft``: assistant-only loss masks, bad SFT rows (file:line, skip or raise), length bucketing, and a run at
TP=2 on CPU (2 gloo ranks under torchrun) whose loss decreases and whose checkpoint starts an RL run."""
import json
from pathlib import Path

import pytest
import torch

from tapo_megatron.data.queries import DataError
from tapo_megatron.logging.tracker import read_metrics
from tapo_megatron.data.assets import data_file
from tapo_megatron.sft import collate_sft, length_buckets, read_sft_rows

WORKER = Path(__file__).with_name("_sft_worker.py")


def test_loss_mask_covers_response_tokens_only():
    pairs = [([5, 6, 7], [8, 9, 2]), ([5], [4, 2])]  # (prompt ids, response ids incl. eos)
    out = collate_sft(pairs, pad_id=0)
    assert out["tokens"].tolist() == [[5, 6, 7, 8, 9, 2], [5, 4, 2, 0, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]]


def test_bad_sft_rows_reported_with_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"prompt": "1+1?", "response": "2"}\n'
                     b'\n'
                     b'{"prompt": "no response"}\n'            # line 3
                     b'[1, 2]\n'                                # line 4
                     b'{"prompt": "p", "response": "\xff"}\n'   # line 5: not UTF-8
                     b'{"prompt": "p", "response": ""}\n'       # line 6: empty
                     b'{"prompt": "2+2?", "response": "4"}\n')
    rows, bad = read_sft_rows(str(path))
    assert rows == [("1+1?", "2"), ("2+2?", "4")]
    assert [(b.line, str(b).split(": ", 1)[1].split(" ")[0]) for b in bad] == [
        (3, "field"), (4, "expected"), (5, "not"), (6, "field")]
    with pytest.raises(DataError, match=rf"{path}:3: field 'response'"):
        read_sft_rows(str(path), on_error="raise")


def test_length_buckets_group_similar_lengths():
    pairs = [([0] * n, [1]) for n in (9, 1, 5, 2, 8, 6, 3, 7)]
    batches = length_buckets(pairs, batch_size=2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))  # a partition: nothing dropped or repeated
    lengths = sorted(sorted(len(pairs[i][0]) for i in b) for b in batches)
    assert lengths == [[1, 2], [3, 5], [6, 7], [8, 9]]
    assert length_buckets(pairs, 2, seed=0) == batches


def test_sft_tp2_loss_decreases_and_starts_rl(tmp_path, workers):
    rows = []
    with open(data_file("deepscaler_sample.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if len(row["problem"]) < 120:  # short prompts keep the 151,936-way logits small
                rows.append(row)
            if len(rows) == 4:
                break
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": r["problem"], "response": f"The answer is "
                                            f"$\\boxed{{{r['answer']}}}$."}) + "\n" for r in rows)
                        + '{"prompt": "a row without a response"}\n')
    rl_data = tmp_path / "rl.jsonl"
    rl_data.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    proc = workers.run(WORKER, sft_data, rl_data, tmp_path / "out", nproc=2)
    assert "skipped 1 bad row(s)" in proc.stdout and f"{sft_data}:5" in proc.stdout

    losses = [r["sft/loss"] for r in read_metrics(tmp_path / "out" / "sft" / "metrics.jsonl")]
    assert len(losses) == 4
    assert losses[0] > 10.0  # ~ln(151,936) = 11.9 for a random init
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 1.5

    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["compared"] >= 10 and result["max_abs_diff"] == 0.0  # the RL engine serves the SFT weights
    rl = read_metrics(tmp_path / "out" / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rl] == [1]
