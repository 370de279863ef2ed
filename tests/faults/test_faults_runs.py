"""Faults injected into real ``tapo sft`` runs (tiny Qwen3, CPU, one process each), one after another in the same
directories: kill -9 mid-step, kill -9 mid-save, disk full during a save, SIGTERM, a bit-flipped shard, a NaN
gradient, a second run in the same directory. After each, the test checks the line the user sees, and at the end
that no completed step, checkpoint or log row was lost or doubled: every step's loss equals the uninterrupted run's.
"""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tapo_megatron.convert.checkpoints import LATEST_FILE, checkpoint_dirs
from tapo_megatron.logging.tracker import read_metrics
from tapo_megatron.runguard import LOCK_FILE, PREEMPTED_EXIT_CODE

WORKER = Path(__file__).with_name("_fault_worker.py")
STEPS = 6
TINY = {"vocab_size": 20, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "max_position_embeddings": 128}


def recipe(out: Path, **checkpoint) -> Path:
    path = out / "recipe.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "model": {"hf_config": TINY}, "parallel": {"micro_batch_size": 4},
        "sft": {"train_iters": STEPS, "global_batch_size": 8, "optimizer": {"lr": 3e-3}},
        "checkpoint": {"save": str(out / "ckpt"), "save_interval": 1, **checkpoint},
        "logging": {"output_dir": str(out / "logs"), "wandb_mode": "disabled", "progress_bar": False}}))
    return path


def sft(workers, out: Path, fault: str = "none", *overrides):
    proc = workers.run(WORKER, fault, "sft", "--config", out / "recipe.yaml", *overrides, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["sft/loss"]) for r in read_metrics(out / "logs" / "metrics.jsonl")]


def pointer(out: Path) -> str:
    return (out / "ckpt" / LATEST_FILE).read_text()


@pytest.fixture(scope="module")
def straight(workers, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    recipe(out)
    rc, log = sft(workers, out)
    assert rc == 0, log
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))
    return out


def test_crash_chain_loses_and_doubles_nothing(workers, tmp_path, straight):
    out = tmp_path / "chain"
    recipe(out, keep_last=3)
    # kill -9 after step 2 is logged, before it is saved: the row of step 2 is logged again on resume, once.
    rc, log = sft(workers, out, "kill_step:2")
    assert rc == -9 and pointer(out) == "1"
    # kill -9 while checkpoint 3 is published: iter_3.tmp is complete but not renamed; the pointer stays at 2.
    rc, log = sft(workers, out, "kill_save:3")
    assert rc == -9, log
    assert "taking over the stale lock" in log and "pid" in log  # the killed run's lock
    assert "dropped 1 row(s)" in log  # step 2's row, past checkpoint 1
    assert pointer(out) == "2" and (out / "ckpt" / "iter_0000003.tmp").is_dir()
    # The disk fills while checkpoint 4 is written: one line with the OS's words and the path, the .tmp removed.
    rc, log = sft(workers, out, "enospc_save:4")
    assert "removed" in log and "iter_0000003.tmp" in log  # the interrupted save of the previous run
    err = log.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("tapo sft: error: saving checkpoint") and "No space left on device" in err
    assert "iter_0000004.tmp" in err
    assert not (out / "ckpt" / "iter_0000004.tmp").exists() and pointer(out) == "3"
    # SIGTERM during step 5: the step finishes, is saved, and the run exits 75.
    rc, log = sft(workers, out, "term_step:5")
    assert rc == PREEMPTED_EXIT_CODE, log
    assert "SIGTERM received" in log and pointer(out) == "5"
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]
    # The last run finishes the job; keep_last=3 left the three newest checkpoints.
    rc, log = sft(workers, out)
    assert rc == 0, log
    assert [p.name for p in checkpoint_dirs(out / "ckpt")] == ["iter_0000006", "iter_0000005", "iter_0000004"]
    assert losses(out) == losses(straight)  # every step once, each as in the uninterrupted run
    assert not (out / "logs" / LOCK_FILE).exists() and not (out / "ckpt" / LOCK_FILE).exists()


def test_bit_flipped_shard_falls_back_and_redoes_the_step(workers, tmp_path, straight):
    out = tmp_path / "flip"
    shutil.copytree(straight, out)
    recipe(out)
    shard = out / "ckpt" / "iter_0000006" / "optim" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in an Adam moment
    shard.write_bytes(bytes(data))
    rc, log = sft(workers, out, "none", f"sft.train_iters={STEPS}")
    assert rc == 0, log
    assert "skipping" in log and "iter_0000006" in log and "optim/__0_0.distcp does not match its sha256" in log
    assert "dropped 1 row(s)" in log
    assert losses(out) == losses(straight)  # step 6 redone from checkpoint 5, exactly


def test_nan_gradient_stops_with_one_line_and_saves_nothing_bad(workers, tmp_path, straight):
    out = tmp_path / "nan"
    recipe(out)
    rc, log = sft(workers, out, "nan_grad_step:3")
    err = log.strip().splitlines()[-1]
    assert rc == 2 and "non-finite gradient at iteration 2" in err and "weights are unchanged" in err, log
    assert pointer(out) == "2" and losses(out) == losses(straight)[:2]
    # The checkpoint left is the finite one of step 2: the next run resumes from it to the uninterrupted numbers.
    rc, log = sft(workers, out)
    assert rc == 0, log
    assert losses(out) == losses(straight)


def test_second_run_in_the_same_directory_is_refused(workers, tmp_path, straight):
    out = tmp_path / "locked"
    recipe(out)
    (out / "logs").mkdir()
    holder = {"pid": 1, "host": __import__("socket").gethostname(), "started": "earlier"}  # pid 1 is alive
    (out / "logs" / LOCK_FILE).write_text(json.dumps(holder))
    rc, log = sft(workers, out)
    err = log.strip().splitlines()[-1]
    assert rc == 2 and "is in use by another run (pid 1 on host" in err, log
    assert not (out / "ckpt").exists() or not checkpoint_dirs(out / "ckpt")  # refused before any work
    assert json.loads((out / "logs" / LOCK_FILE).read_text()) == holder  # the holder's lock is untouched


def test_sigterm_in_the_rl_loop_saves_the_step_and_resumes(workers, tmp_path):
    """``tapo train`` with no interval saves: SIGTERM during step 1 still leaves a checkpoint of step 1."""
    from tapo_megatron.recipes import RECIPES_DIR

    out = tmp_path / "rl"
    args = ["train", "--config", RECIPES_DIR / "demo.yaml", "train_iters=2", "rollout.rollout_batch_size=4",
            "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=12", "data.num_train_problems=50",
            "data.num_eval_problems=4", "data.reward=_loop_worker:parity_reward", "logging.wandb_mode=disabled",
            "logging.progress_bar=false", f"logging.output_dir={out}/logs", f"checkpoint.save={out}/ckpt",
            "checkpoint.save_interval=0", f"checkpoint.export_hf={out}/hf"]
    proc = workers.run(WORKER, "term_step:1", *args, check=False)
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SIGTERM received: finishing this step" in proc.stdout
    assert pointer(out) == "1" and not (out / "hf").exists()  # saved; no export of an unfinished run
    proc = workers.run(WORKER, "none", *args, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout
    assert [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl")] == [1, 2]
    assert pointer(out) == "2" and (out / "hf" / "config.json").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.4 MB tmpfs (room for two of the tiny model's checkpoints), where the machine lets the test mount
    one (root, CAP_SYS_ADMIN); elsewhere the injected ENOSPC of the crash chain stands in."""
    import os
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_disk_full_keeps_the_previous_checkpoints(workers, tmp_path, small_disk):
    out = tmp_path / "full"
    recipe(out)
    rc, log = sft(workers, out, "none", f"checkpoint.save={small_disk}/ckpt")
    err = log.strip().splitlines()[-1]
    assert rc == 2 and "No space left on device" in err and "iter_0000003.tmp" in err, log
    assert [p.name for p in checkpoint_dirs(small_disk / "ckpt")] == ["iter_0000002", "iter_0000001"]
    assert (small_disk / "ckpt" / LATEST_FILE).read_text() == "2"
    assert not list((small_disk / "ckpt").glob("*.tmp"))  # the partial save does not keep the disk full
