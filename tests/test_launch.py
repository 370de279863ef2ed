"""NeMo-Run launch: the local executor really runs the tiny recipe under torchrun (2 processes); the Slurm and
Docker dry-runs carry the layout, image, mounts, environment and the trainer / engine commands."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tapo_megatron.launch import experiment as ex

IMAGE = "registry.example.com/tapo-megatron:0.1"


@pytest.fixture(autouse=True)
def _no_stdin(monkeypatch):
    # NeMo-Run's local tunnel runs shell commands through invoke, which reads stdin; pytest forbids that.
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def _slurm_args(tmp_path, recipe, preset, *extra):
    return ex.parse_args(["slurm", "--recipe", recipe, "--preset", preset, "--account", "acct", "--partition",
                          "batch", "--container-image", IMAGE, "--data-dir", "/lustre/tapo/data", "--models-dir",
                          "/lustre/tapo/models", "--runs-dir", str(tmp_path / "runs"), "--mount",
                          "/lustre/home:/home", "--dryrun", *extra])


def _render(args):
    exp, role = ex.build(args)
    return ex.render_dryrun(exp, role), role


def test_slurm_dryrun_separate_engine_pool(tmp_path):
    text, role = _render(_slurm_args(tmp_path, "qwen3_8b_tapo", "h100_4x8"))
    sbatch = text.split("# ---- role script ----")[0]
    assert "#SBATCH --nodes=4" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch
    assert "#SBATCH --ntasks-per-node=1" in sbatch and "#SBATCH --account=acct" in sbatch
    assert "#SBATCH --partition=batch" in sbatch
    assert f"--container-image {IMAGE}" in sbatch
    mounts = re.search(r"--container-mounts (\S+)", sbatch).group(1).split(",")
    assert {"/lustre/tapo/data:/data", "/lustre/tapo/models:/models", f"{tmp_path}/runs:/runs",
            "/lustre/home:/home"} <= set(mounts)
    for line in ("export NCCL_DEBUG=WARN", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "export WANDB_PROJECT=tapo-megatron",
                 "export WANDB_NAME=qwen3_8b_tapo", f"export TAPO_CONTAINER_IMAGE={IMAGE}", "export TAPO_RUNS=/runs",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1"):
        assert line in sbatch, line
    # the wandb key is passed by name only, never written into the script
    assert "--container-env WANDB_API_KEY" in sbatch and "WANDB_API_KEY=" not in text
    # engine pool: nodes 0-1, 4 servers of TP 2 per node on disjoint GPUs and ports
    assert "ENGINE_NODES=2" in role
    servers = re.findall(r"CUDA_VISIBLE_DEVICES=(\S+) python -m sglang.launch_server --model-path (\S+) --tp-size 2 "
                         r"--host 0.0.0.0 --port (\d+)", role)
    assert servers == [("0,1", "${TAPO_MODELS}/Qwen3-8B", "30000"), ("2,3", "${TAPO_MODELS}/Qwen3-8B", "30001"),
                       ("4,5", "${TAPO_MODELS}/Qwen3-8B", "30002"), ("6,7", "${TAPO_MODELS}/Qwen3-8B", "30003")]
    # trainer: the other 2 nodes, 8 ranks each, rendezvous on the first trainer node
    assert ("torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$((SLURM_NODEID - ENGINE_NODES)) "
            "--master-addr=${nodes[ENGINE_NODES]} --master-port=29500 -m tapo_megatron.commands train "
            "--config ${TAPO_RUNS}/qwen3_8b_tapo/config.yaml") in role
    assert "export TAPO_ENGINE_URLS=" in role
    assert '"rollout.engine_urls=[$TAPO_ENGINE_URLS]" rollout.weight_sync_master_address=${nodes[ENGINE_NODES]}' in role
    # the embedded config is the resolved recipe + preset, ${VAR}s unexpanded
    body = role.split("<<'TAPO_CONFIG_EOF'\n")[1].split("\nTAPO_CONFIG_EOF")[0]
    cfg = yaml.safe_load(body)
    assert cfg["parallel"]["tensor_model_parallel_size"] == 2 and cfg["launch"]["engine_placement"] == "separate"
    assert cfg["rollout"]["weight_sync_mode"] == "distributed" and cfg["rollout"]["num_engines"] == 8
    assert cfg["tapo"]["enabled"] is True and cfg["train_iters"] == 500
    # RL trains on the ZPD filter's output of the cold-start stages, on the shared runs volume
    assert cfg["data"]["train_file"] == "${TAPO_RUNS}/qwen3_8b_coldstart/rl_queries.jsonl"


def test_slurm_dryrun_colocated_overrides(tmp_path):
    text, role = _render(_slurm_args(tmp_path, "qwen3_0_6b_grpo", "h100_1x8", "train_iters=7"))
    assert "#SBATCH --nodes=1" in text and "sglang.launch_server" not in role
    assert ("torchrun --nnodes=1 --nproc-per-node=8 --node-rank=$SLURM_NODEID --master-addr=${nodes[0]} "
            "--master-port=29500 -m tapo_megatron.commands train") in role
    body = role.split("<<'TAPO_CONFIG_EOF'\n")[1].split("\nTAPO_CONFIG_EOF")[0]
    assert yaml.safe_load(body)["train_iters"] == 7


def test_docker_dryrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    args = ex.parse_args(["docker", "--recipe", "qwen3_1_7b_tapo", "--preset", "h100_1x8", "--container-image", IMAGE,
                          "--data-dir", "/srv/data", "--models-dir", "/srv/models", "--runs-dir", "/srv/runs",
                          "--dryrun"])
    exp, role = ex.build(args)
    text = ex.render_dryrun(exp, role)
    cmd = text.split("# ---- role script ----")[0]
    # NeMo-Run's scheduler mounts the job directory at /nemo_run: the packaged role script runs from there
    job_dir = exp.jobs[0]._dryrun_info.request.executor.job_dir
    assert job_dir and f"-v {job_dir}:/nemo_run " in cmd and "bash /nemo_run/scripts/rl.sh" in cmd
    assert cmd.startswith("docker network create --driver bridge ")
    for part in ("docker run --rm -d ", "--runtime nvidia", "--gpus 8", "--ipc host", "--shm-size 64g",
                 "--ulimit memlock=-1:-1", "-v /srv/data:/data", "-v /srv/models:/models", "-v /srv/runs:/runs",
                 f" {IMAGE} ", "--workdir /nemo_run/code",
                 "-e NCCL_DEBUG=WARN", "-e 'WANDB_API_KEY=***'", f"-e TAPO_CONTAINER_IMAGE={IMAGE}"):
        assert part in cmd, part
    assert "secret-key-123" not in text
    assert ("torchrun --nnodes=1 --nproc-per-node=8 --node-rank=0 --master-addr=localhost --master-port=29500 "
            "-m tapo_megatron.commands train --config /runs/qwen3_1_7b_tapo/config.yaml") in role


def test_docker_dryrun_is_what_nemo_run_starts(tmp_path):
    """The printed argv is derived from the keyword arguments NeMo-Run's own DockerContainer.run passes to
    docker-py (recorded, not rebuilt): every volume, env var and the command appear."""
    args = ex.parse_args(["docker", "--recipe", "qwen3_0_6b_grpo", "--preset", "h100_1x8", "--container-image", IMAGE,
                          "--runs-dir", str(tmp_path / "runs"), "--dryrun"])
    exp, _ = ex.build(args)
    with exp:
        exp.dryrun(log=False)
    request = exp.jobs[0]._dryrun_info.request
    networks, argv = ex.docker_run_args(request)
    client = ex._RecordingDockerClient()
    container = request.containers[0]
    before = list(container.executor.volumes)
    container.executor.volumes.append(f"{request.executor.job_dir}:/nemo_run")
    container.run(client=client, id=request.id)  # NeMo-Run's own code, same request
    container.executor.volumes = before
    kw = next(c for kind, c in client.calls if kind == "container")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-v"] == kw["volumes"]
    assert {a.split("=", 1)[0] for i, a in enumerate(argv) if i and argv[i - 1] == "-e"} == set(kw["environment"])
    from docker.utils import split_command  # what docker-py does with a string command

    assert argv[argv.index(IMAGE) + 1:] == split_command(kw["command"])
    assert argv[argv.index(IMAGE) + 1:][:2] == ["bash", "-c"]
    assert networks == [c["name"] for kind, c in client.calls if kind == "network"]


def _sbatch(text: str) -> list[str]:
    return [line for line in text.split("# ---- role script ----")[0].splitlines() if line.startswith("#SBATCH")]


def test_slurm_dryrun_survives_time_limit_and_preemption(tmp_path):
    import nemo_run as run

    args = _slurm_args(tmp_path, "qwen3_8b_tapo", "h100_4x8", "--signal-lead", "420")
    exp, role = ex.build(args)
    executor = exp.jobs[0].executor
    assert isinstance(executor, run.SlurmExecutor)
    assert (executor.mem, executor.exclusive, executor.signal) == ("0", True, "USR1@420")
    assert executor.additional_parameters == {"requeue": True} and executor.open_mode == "append"
    text = ex.render_dryrun(exp, role)
    for flag in ("#SBATCH --mem=0", "#SBATCH --exclusive", "#SBATCH --signal=USR1@420", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append"):
        assert flag in _sbatch(text), flag
    # trainer and engines start with SIGUSR1 ignored (the trainer installs its own handler); node 0 requeues
    assert role.count("keep_usr1 ") == 1 + 4 and "keep_usr1 torchrun" in role and "keep_usr1 env CUDA_VISIBLE" in role
    assert f"rc={ex.REQUEUE_EXIT}" in role
    # the requeue itself: NeMo-Run's batch script, on the host, when the step failed and retries remain
    assert executor.retries == 20 and "export TORCHX_MAX_RETRIES=20" in text
    assert re.search(r'if \[ \$exitcode -ne 0 \]; then\s+if \[ "\$TORCHX_MAX_RETRIES" -gt "\$\{SLURM_RESTART_COUNT:-0\}" \]; '
                     r'then\s+scontrol requeue "\$SLURM_JOB_ID"', text)
    # --no-requeue: neither the sbatch flag, the retries nor the requeue exit in the role script
    exp, role = ex.build(_slurm_args(tmp_path, "qwen3_8b_tapo", "h100_4x8", "--no-requeue"))
    text = ex.render_dryrun(exp, role)
    assert "#SBATCH --requeue" not in _sbatch(text) and "TORCHX_MAX_RETRIES=0" in text and "rc=75" not in role


SIGNAL_CHILD = """
import os, signal, sys, time
assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, "SIGUSR1 not ignored at start"
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))  # what the trainer does: checkpoint, then exit
open(sys.argv[1], "w").close()
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)
print("trainer saw SIGUSR1" if got else "trainer timed out")
sys.exit(0 if got else 3)
"""


def test_role_script_signal_reaches_trainer_and_asks_for_requeue(tmp_path):
    """The role script's signal plumbing run for real in bash: SIGUSR1 sent to the whole process group (as
    slurmstepd signals a job step) leaves bash and the launcher alive, reaches the trainer's handler, and the script
    then exits with the requeue code (NeMo-Run's batch script requeues on it)."""
    (tmp_path / "child.py").write_text(SIGNAL_CHILD)
    ready = tmp_path / "ready"
    script = "\n".join(["set -uo pipefail", *ex.SIGNAL_PRELUDE,
                        f"keep_usr1 {sys.executable} {tmp_path / 'child.py'} {ready}", "rc=$?",
                        *ex.requeue_lines(True), 'echo "rc=$rc usr1=$usr1"', "exit $rc"])
    env = {**os.environ, "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    for _ in range(600):
        if ready.exists():
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == ex.REQUEUE_EXIT, out + err
    assert "trainer saw SIGUSR1" in out and f"rc={ex.REQUEUE_EXIT} usr1=1" in out


def test_slurm_ssh_tunnel_from_a_workstation(tmp_path):
    import nemo_run as run

    args = ex.parse_args(["slurm", "--recipe", "qwen3_0_6b_grpo", "--preset", "h100_1x8", "--account", "acct",
                          "--container-image", IMAGE, "--ssh-host", "login.example.com", "--ssh-user", "alice",
                          "--ssh-identity", "~/.ssh/id_ed25519", "--job-dir", "/lustre/jobs", "--dryrun"])
    exp, role = ex.build(args)
    tunnel = exp.jobs[0].executor.tunnel
    assert isinstance(tunnel, run.SSHTunnel)
    assert (tunnel.host, tunnel.user, tunnel.identity) == ("login.example.com", "alice", "~/.ssh/id_ed25519")
    text = ex.render_dryrun(exp, role)  # a dry run opens no connection
    assert tunnel.job_dir.startswith("/lustre/jobs/") and f"--output={tunnel.job_dir}/rl/" in text
    with pytest.raises(ex.ConfigError, match="--job-dir"):
        ex.build(ex.parse_args(["slurm", "--recipe", "qwen3_0_6b_grpo", "--container-image", IMAGE,
                                "--ssh-host", "login.example.com", "--ssh-user", "alice"]))


def test_docker_refuses_separate_pool():
    args = ex.parse_args(["docker", "--recipe", "qwen3_8b_tapo", "--preset", "h100_4x8", "--container-image", IMAGE])
    with pytest.raises(ValueError, match="one node"):
        ex.build(args)


def test_local_torchrun_runs_tiny_recipe(tmp_path):
    """The acceptance run: NeMo-Run LocalExecutor -> torchrun (2 procs) -> tapo train on the tiny recipe -> HF."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true",
           "NEMORUN_HOME": str(tmp_path / "nemorun_home")}
    cmd = [sys.executable, "-m", "tapo_megatron.commands", "launch", "local", "--recipe", "tiny", "--nproc", "2",
           "--out", str(out), f"checkpoint.save={out}/ckpt", f"checkpoint.export_hf={out}/hf",
           f"logging.output_dir={out}/run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all("loss" in r and r["traj/num_original"] == 8 for r in records)  # K=8 samples of 1 prompt
    assert (out / "ckpt" / "iter_0000002" / "state.json").is_file()
    assert json.loads((out / "ckpt" / "iter_0000002" / "state.json").read_text())["world_size"] == 2
    hf = out / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (32, 2, 151936)
    assert (hf / "tokenizer.json").is_file() and list(hf.glob("*.safetensors"))
    assert (out / "run" / "curves.png").is_file()
