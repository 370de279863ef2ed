"""Bad input refused before any expensive work, with one line: out-of-range counts and intervals, unknown plug-in
names, gold answers the verifier cannot parse, prompts longer than the context leaves room for; a batch of hanging
responses bounded by the step deadline; ``math_reward`` from a script without a ``__main__`` guard; a stale run lock
taken over; a log torn by a kill mid-write continued without duplicates."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tapo_megatron.commands import main
from tapo_megatron.config import ConfigError, DataConfig, ModelConfig, load_config
from tapo_megatron.data.assets import qwen3_tokenizer_dir
from tapo_megatron.logging.tracker import MetricsLogger, read_metrics
from tapo_megatron.rewards import MathVerifier
from tapo_megatron.runguard import LOCK_FILE, DirLock
from tapo_megatron.tasks import build_task, fit_prompts

DEMO = str(Path(__file__).resolve().parents[2] / "tapo_megatron" / "recipes" / "demo.yaml")


def hang(response: str, gold: str) -> float:
    """A verification that never ends (sympy on a pathological input), except for the warm-up item."""
    if response != "fast":
        time.sleep(600)
    return 1.0


@pytest.mark.parametrize("override, message", [
    ("checkpoint.save_interval=-1", "checkpoint.save_interval=-1 must be >= 0"),
    ("rollout.rollout_batch_size=0", "rollout.rollout_batch_size=0 must be >= 1"),
    ("train_iters=0", "train_iters=0 must be >= 1"),
    ("checkpoint.keep_last=-2", "checkpoint.keep_last=-2 must be >= 0"),
    ("data.reward=nosuch", "data.reward='nosuch': unknown reward 'nosuch'; registered:"),
    ("algorithm.policy_loss=nosuch", "algorithm.policy_loss='nosuch': unknown policy loss"),
])
def test_bad_config_is_one_line_before_any_model(capsys, override, message):
    start = time.perf_counter()
    assert main(["train", "--config", DEMO, override, "logging.wandb_mode=disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and message in err, err
    assert time.perf_counter() - start < 30  # refused at validate(), not after building the model and engine


def test_unknown_names_are_config_errors_and_key_errors():
    with pytest.raises(ConfigError, match="tapo.constructor='nosuch'"):
        load_config(DEMO, ["tapo.enabled=true", "tapo.constructor=nosuch"])
    from tapo_megatron.rewards import get_reward

    with pytest.raises(KeyError) as info:  # what callers caught before keeps working
        get_reward("nosuch")
    assert str(info.value).startswith("unknown reward 'nosuch'")


def test_unparseable_gold_answers_and_long_prompts_are_dropped_and_reported(tmp_path, capsys, caplog):
    rows = [{"id": "ok", "problem": "What is 1+1?", "answer": "2"},
            {"id": "nogold", "problem": "What is 2+2?", "answer": "$"},
            {"id": "long", "problem": "Add these numbers: " + " + ".join(["1"] * 400), "answer": "400"},
            {"id": "ok2", "problem": "What is 3+3?", "answer": "6"}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "torn", "problem": "What\n')
    task = build_task(DataConfig(task="math", train_file=str(data), eval_files=[str(data)]),
                      ModelConfig(tokenizer=str(qwen3_tokenizer_dir())), seed=0)
    assert [q.id for q in task.train] == ["ok", "long", "ok2"]
    assert any(f"{data}: skipped 2 bad row(s) of 5; first: {data}:2: gold answer '$': the math verifier cannot "
               "parse it" in r.getMessage() for r in caplog.records), caplog.text
    task = fit_prompts(task, max_prompt_tokens=200)
    assert [q.id for q in task.train] == ["ok", "ok2"] and [q.id for q in task.evals["train"]] == ["ok", "ok2"]
    out = capsys.readouterr().out
    assert "dropped 1 of 3 queries whose prompt is longer than 200 tokens" in out and "first: 'long'" in out


def test_a_step_of_hanging_responses_is_bounded_by_the_step_deadline():
    timeout_s = 1.0
    with MathVerifier(num_workers=2, timeout_s=timeout_s, worker_fn=hang) as pool:
        assert pool.score_batch(["fast"] * 4, ["1"] * 4) == [1.0] * 4  # both workers started and ready
        start = time.perf_counter()
        scores = pool.score_batch(["HANG"] * 256, ["1"] * 256)
        elapsed = time.perf_counter() - start
        assert scores == [0.0] * 256
        assert elapsed < 2 * timeout_s + 1.5, elapsed  # not 256 / 2 workers x 1 s
        assert pool.stats.num_timeouts + pool.stats.num_abandoned == 256


def test_math_reward_from_a_script_without_a_main_guard(tmp_path, workers):
    script = tmp_path / "score.py"
    script.write_text("from tapo_megatron.rewards import math_reward\n"
                      'print("reward", math_reward("\\\\boxed{4}", "4"))\n')
    proc = workers.run(script, cwd=tmp_path)
    assert proc.stdout.count("reward 1.0") == 1, proc.stdout + proc.stderr
    piped = subprocess.run([sys.executable, "-"], input=script.read_text(), capture_output=True, text=True,
                           env=workers.env(), cwd=tmp_path, timeout=300)
    assert piped.returncode == 0 and piped.stdout.count("reward 1.0") == 1, piped.stderr


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    lock = DirLock(tmp_path)
    lock.acquire()
    assert f"taking over the stale lock {tmp_path / LOCK_FILE} of pid {dead.pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_log_torn_by_a_kill_continues_without_duplicates(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')  # killed mid-row
    with MetricsLogger(tmp_path, run_name="t", config={}, wandb_mode="disabled", resume=True, resume_step=1) as m:
        m.log(2, {"loss": 0.8})
    assert [(r["step"], r["loss"]) for r in read_metrics(log)] == [(1, 1.0), (2, 0.8)]
    with MetricsLogger(tmp_path, run_name="t", config={}, wandb_mode="disabled") as m:  # a fresh start keeps it
        m.log(1, {"loss": 5.0})
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.1.jsonl")] == [1.0, 0.8]
    assert [r["loss"] for r in read_metrics(log)] == [5.0]


def test_reward_workers_outlive_a_preemption_signal():
    """Slurm signals every process of the job: the step being finished must still get real rewards."""
    import signal

    with MathVerifier(num_workers=2, timeout_s=10.0) as pool:
        assert pool.score_batch(["\\boxed{1}"] * 2, ["1"] * 2) == [1.0, 1.0]
        for worker in pool._workers:
            os.kill(worker.process.pid, signal.SIGTERM)
            os.kill(worker.process.pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert pool.score_batch(["\\boxed{2}", "\\boxed{3}", "\\boxed{5}"], ["2", "3", "4"]) == [1.0, 1.0, 0.0]
        assert pool.stats.num_crashes == 0 and pool.stats.num_restarts == 0


def test_stop_signals_finish_the_step_and_a_second_ctrl_c_stops_at_once(capsys):
    import signal

    from tapo_megatron.runguard import RunGuard

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        guard = RunGuard([])
        guard._install()
        try:
            os.kill(os.getpid(), sig)
            assert guard.stop_requested() and guard.stop_signal == sig.name
            assert f"{sig.name} received: finishing this step" in capsys.readouterr().out
            if sig == signal.SIGINT:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
        finally:
            guard.close()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored after the run


def test_half_written_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"pid": ')  # its writer was killed between create and write
    lock = DirLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
