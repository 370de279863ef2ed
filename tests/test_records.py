"""Records users expect: the wandb offline run of a short training holds the rollout-sample table, the config and
HF-export artifacts, and a resumed run continues the same wandb run; samples mark the injected part; plot axes
show whole steps; the eval comparison PNG."""
from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest

from tapo_megatron.logging import plots
from tapo_megatron.logging.tracker import INJECTED_CLOSE, INJECTED_OPEN, SAMPLE_COLUMNS, sample_rows
from tapo_megatron.records import Provenance, Trajectory, TrajectoryKind

WORKER = Path(__file__).with_name("_loop_worker.py")


def wandb_records(path: str):
    """The records of a wandb ``run-<id>.wandb`` file. wandb 0.31 no longer ships a Python reader; the file is a
    LevelDB-style log (wandb's former ``sdk/internal/datastore.py``): a 7-byte ``:W&B`` header, then 32 KiB blocks
    of chunks ``crc32 u32, length u16, type u8`` (1 full, 2 first, 3 middle, 4 last), each record a protobuf
    ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def _summary(run_file: str) -> dict:
    out = {"run_id": None, "artifacts": [], "tables": []}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = r.run.run_id
        elif kind == "artifact":
            out["artifacts"].append((r.artifact.type, r.artifact.name, [m.path for m in r.artifact.manifest.contents],
                                     [m.ref for m in r.artifact.manifest.contents]))
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): i.value_json for i in r.history.item}
            if items.get("rollout/samples/_type") == '"table-file"':
                out["tables"].append((int(items["_step"]), json.loads(items["rollout/samples/path"])))
    return out


def test_wandb_offline_run_holds_samples_and_artifacts_and_resumes_same_id(workers, tmp_path):
    args = ["logging.wandb_mode=offline", "logging.sample_table_interval=1", "logging.sample_table_rows=6",
            f"checkpoint.export_hf={tmp_path}/hf"]
    workers.run(WORKER, tmp_path, 2, "-", *args, timeout=600)
    workers.run(WORKER, tmp_path, 4, "-", *args, timeout=600)  # resumes from the step-2 checkpoint
    runs = sorted(glob.glob(str(tmp_path / "logs" / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(runs) == 2, runs
    first, resumed = _summary(runs[0]), _summary(runs[1])
    state = json.loads((tmp_path / "logs" / "wandb_run.json").read_text())
    assert first["run_id"] == resumed["run_id"] == state["id"]
    assert [s for s, _ in first["tables"]] == [1, 2] and [s for s, _ in resumed["tables"]] == [3, 4]
    kinds = {(kind, name) for kind, name, _, _ in first["artifacts"]}
    assert ("config", f"config-{state['id']}") in kinds
    model = [a for a in first["artifacts"] if a[0] == "model"]
    assert model and "config.json" in model[0][2] and all(ref.startswith("file://") for ref in model[0][3])
    assert not any(kind == "config" for kind, *_ in resumed["artifacts"])  # logged once per wandb run
    # the table as wandb wrote it: our columns, constructed rows with the injected part marked
    table_path = Path(runs[0]).parent / "files" / first["tables"][0][1]
    table = json.loads(table_path.read_text())
    assert table["columns"] == SAMPLE_COLUMNS and 1 <= len(table["data"]) <= 6
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    built = [r for r in rows if r["kind"] == "constructed"]
    assert built and all(INJECTED_OPEN + r["injected"].split(" | ")[0] in r["response"] for r in built)
    assert any(r["kind"] == "original" and not r["injected"] for r in rows)
    local = [json.loads(line) for line in (tmp_path / "logs" / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in local}) == [1, 2, 3, 4]


class _CharTokenizer:
    def decode(self, ids, skip_special: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def _traj(kind, text, prov):
    return Trajectory(query_id="q", kind=kind, advantage_group=0, prompt_ids=[ord(c) for c in "P>"],
                      response_ids=[ord(c) for c in text], provenance=prov, reward=1.0, advantage=0.5)


def test_sample_rows_mark_every_injected_run():
    S, I = Provenance.SAMPLED, Provenance.INJECTED
    built = _traj(TrajectoryKind.CONSTRUCTED, "abXYcdZ", [S, S, I, I, S, S, I])
    plain = _traj(TrajectoryKind.ORIGINAL, "abc", [S, S, S])
    rows = sample_rows([plain, plain, built, plain], _CharTokenizer(), limit=2)
    assert [r[1] for r in rows] == ["constructed", "original"]
    row = dict(zip(SAMPLE_COLUMNS, rows[0]))
    assert row["response"] == f"ab{INJECTED_OPEN}XY{INJECTED_CLOSE}cd{INJECTED_OPEN}Z{INJECTED_CLOSE}"
    assert row["injected"] == "XY | Z" and row["prompt"] == "P>"
    assert dict(zip(SAMPLE_COLUMNS, rows[1]))["injected"] == ""


def test_curves_have_whole_step_ticks(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figs.append(fig) or Path(out))
    plots.plot_curves({"a": [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]}, ["loss"], tmp_path / "c.png")
    ax = figs[0].axes[0]
    figs[0].canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_eval_comparison_png_across_runs(tmp_path):
    runs = {"grpo": [{"step": 5, "eval/test/greedy_accuracy": 0.2, "eval/test/num_problems": 16.0},
                     {"step": 10, "eval/test/greedy_accuracy": 0.3}],
            "tapo": [{"step": 10, "eval/test/greedy_accuracy": 0.5, "eval/test/pass@1": 0.4}]}
    assert plots.last_values(runs["grpo"], "eval/")["eval/test/greedy_accuracy"] == 0.3
    png = plots.plot_eval_comparison(runs, tmp_path / "eval_compare.png")
    assert png.is_file() and png.stat().st_size > 1000
    with pytest.raises(ValueError, match="no eval"):
        plots.plot_eval_comparison({"x": [{"step": 1, "loss": 1.0}]}, tmp_path / "none.png")


def test_eval_compare_training_command(tmp_path):
    from tapo_megatron.commands import main

    for name, acc in (("grpo", 0.25), ("tapo", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval/test/greedy_accuracy": acc}) + "\n")
    assert main(["eval", "--compare-training", str(tmp_path / "grpo"), str(tmp_path / "tapo"), "--out",
                 str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "eval_compare.png").is_file()


def test_sample_table_settings_are_range_checked():
    from tapo_megatron.config import ConfigError
    from _loop_worker import loop_config

    for override in ("logging.sample_table_interval=-1", "logging.sample_table_rows=0"):
        with pytest.raises(ConfigError, match="sample_table"):
            loop_config("/tmp/unused", 1, [override]).validate()
