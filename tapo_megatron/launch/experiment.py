"""NeMo-Run entry point: one ``run.Experiment`` per recipe, on a local, Slurm or Docker executor.

    tapo launch local  --recipe tiny --nproc 2                                       # torchrun on this machine
    tapo launch slurm  --recipe qwen3_8b_tapo --preset h100_4x8 \\
        --account ACC --partition batch --container-image IMG \\
        --models-dir /lustre/tapo/models --runs-dir /lustre/tapo/runs --dryrun
    tapo launch docker --recipe qwen3_0_6b_tapo --preset h100_1x8 --container-image IMG --dryrun

The recipe (+ preset + ``section.field=value`` overrides) is resolved here, written into the job script verbatim
with its ``${TAPO_*}`` references unexpanded, and expanded inside the job, where ``TAPO_MODELS`` and ``TAPO_RUNS``
(and ``TAPO_DATA`` with ``--data-dir``) name the mounted folders. The shipped data sets and tokenizer travel inside
the installed package. On Slurm, one task per node runs the role script: with
``launch.engine_placement=colocated`` every node runs the trainer (torchrun, one rank per GPU) and the engines
live on the trainer GPUs; with ``separate`` the first ``launch.engine_nodes`` nodes start SGLang servers (one per
``launch.engine_tp`` GPUs) and the other nodes run the trainer, which finds them in ``TAPO_ENGINE_URLS``.
``--dryrun`` prints the sbatch script (Slurm) or ``docker run`` command (Docker) and the role script.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tapo_megatron.config import ConfigError, TrainConfig, to_dict
from tapo_megatron.launch.plan import make_layout
from tapo_megatron.recipes import load_preset, preset_for, resolve_recipe

# Inside the container: where the launcher mounts data, models and run outputs.
CONTAINER_DATA, CONTAINER_MODELS, CONTAINER_RUNS = "/data", "/models", "/runs"
MASTER_PORT = 29500
SECRET_ENV = ("WANDB_API_KEY",)  # passed through by name, never written into scripts


@dataclass
class JobSpec:
    """Everything a launch needs besides the recipe. ``mounts``: extra ``host:container`` pairs."""

    nodes: int = 1
    gpus_per_node: int = 8
    container_image: str = ""
    data_dir: str = ""
    models_dir: str = ""
    runs_dir: str = ""
    mounts: list[str] = field(default_factory=list)
    account: str = ""
    partition: str = ""
    time: str = "04:00:00"
    job_dir: str = ""  # Slurm: where NeMo-Run writes sbatch scripts and logs (shared filesystem)
    signal_lead_s: int = 300  # Slurm: SIGUSR1 this long before the time limit, so the trainer checkpoints
    requeue: bool = True  # Slurm: requeue after the time-limit signal (and on preemption / node failure)
    max_requeues: int = 20  # Slurm: NeMo-Run's batch script requeues a failed attempt at most this often
    ssh_host: str = ""  # Slurm: submit from a workstation through SSH to this login node (job_dir is remote)
    ssh_user: str = ""
    ssh_identity: str = ""
    engine_model: str = ""  # SGLang --model-path (HF dir); default ${TAPO_MODELS}/<model.name>
    nccl_socket_ifname: str = ""
    env: dict = field(default_factory=dict)


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved recipe as YAML, ``${VAR}`` references kept (expanded by ``tapo train`` inside the job)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def job_env(cfg: TrainConfig, spec: JobSpec, container: bool) -> dict[str, str]:
    """Environment of every task: folders, NCCL, wandb, offline hubs. Secrets are not included (see SECRET_ENV)."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "WANDB_PROJECT": cfg.logging.wandb_project,
        "WANDB_NAME": cfg.logging.run_name,
    }
    if container:
        env.update({
            "TAPO_MODELS": CONTAINER_MODELS, "TAPO_RUNS": CONTAINER_RUNS,
            "TAPO_CONTAINER_IMAGE": spec.container_image,  # recorded in wandb by logging.tracker
            "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # Megatron: keeps TP communication ordered with compute
            "NCCL_DEBUG": "WARN",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a dead rank fails the job instead of hanging it
            "NCCL_NVLS_ENABLE": "0",  # NVLink SHARP buffers cost GPU memory the KV cache wants
        })
        if spec.data_dir:
            env["TAPO_DATA"] = CONTAINER_DATA  # the user's own data sets; the shipped ones are in the package
        if spec.nccl_socket_ifname:
            env["NCCL_SOCKET_IFNAME"] = spec.nccl_socket_ifname
    env.update(spec.env)
    return env


def container_mounts(spec: JobSpec) -> list[str]:
    mounts = []
    for host, inside in ((spec.data_dir, CONTAINER_DATA), (spec.models_dir, CONTAINER_MODELS),
                         (spec.runs_dir, CONTAINER_RUNS)):
        if host:
            mounts.append(f"{host}:{inside}")
    return mounts + list(spec.mounts)


def trainer_command(config_path: str, nnodes: int, nproc: int, node_rank: str, master_addr: str) -> str:
    """torchrun over the trainer nodes (one rank per GPU) running ``tapo train``."""
    return (f"torchrun --nnodes={nnodes} --nproc-per-node={nproc} --node-rank={node_rank} "
            f"--master-addr={master_addr} --master-port={MASTER_PORT} "
            f"-m tapo_megatron.commands train --config {config_path}")


def engine_commands(cfg: TrainConfig, spec: JobSpec) -> list[str]:
    """One SGLang server per ``engine_tp`` GPUs of an engine node, ports from ``launch.engine_port`` upward."""
    la = cfg.launch
    model = spec.engine_model or cfg.rollout.engine_model_path or f"${{TAPO_MODELS}}/{cfg.model.name}"
    out = []
    for e in range(spec.gpus_per_node // la.engine_tp):
        gpus = ",".join(str(e * la.engine_tp + g) for g in range(la.engine_tp))
        out.append(f"CUDA_VISIBLE_DEVICES={gpus} python -m sglang.launch_server --model-path {model} "
                   f"--tp-size {la.engine_tp} --host 0.0.0.0 --port {la.engine_port + e} --dtype bfloat16 "
                   f"--mem-fraction-static {la.engine_mem_fraction} --skip-tokenizer-init")
    return out


# Slurm sends the time-limit signal (``--signal=USR1@N``, no ``B:``) to every process of the job step: bash, torchrun,
# the trainer ranks and the SGLang servers. Only the trainer acts on it (it checkpoints and exits: the reliability
# side in train.py); torchrun and SGLang would die of it (SIGUSR1's default action), so they start with it ignored,
# which exec keeps and the trainer's own handler overrides. The role shell notes it and, once the trainer has
# exited, exits with REQUEUE_EXIT; NeMo-Run's batch script (on the host, where scontrol is: the role script runs in
# the container) requeues a job whose step failed while ``executor.retries`` > ``SLURM_RESTART_COUNT``.
REQUEUE_EXIT = 75
SIGNAL_PRELUDE = (
    "usr1=0; trap 'usr1=1' USR1  # the time-limit signal; acted on once the trainer has exited",
    "keep_usr1() { ( trap '' USR1; exec \"$@\" ); }  # start a command with SIGUSR1 ignored (kept across exec)",
)


def requeue_lines(requeue: bool) -> list[str]:
    """After the trainer exits: ask for a requeue if the time-limit signal came (the next attempt resumes from
    ``checkpoint.save``)."""
    if not requeue:
        return []
    return [f'if [ "$usr1" = 1 ]; then echo "time limit near: asking for a requeue of job $SLURM_JOB_ID"; '
            f'rc={REQUEUE_EXIT}; fi']


def role_script(cfg: TrainConfig, spec: JobSpec) -> str:
    """The bash script one Slurm task per node runs: writes the config, then starts this node's role."""
    lo = make_layout(cfg, spec.nodes, spec.gpus_per_node)
    run_dir = f"${{TAPO_RUNS}}/{cfg.logging.run_name}"
    cfg_path = f"{run_dir}/config.yaml"
    lines = [
        "set -uo pipefail",
        *SIGNAL_PRELUDE,
        f"mkdir -p {run_dir}",
        "# The resolved recipe; ${TAPO_*} references are expanded by `tapo train` from this job's environment.",
        "if [ \"$SLURM_NODEID\" = 0 ]; then",
        f"cat > {cfg_path}.tmp <<'TAPO_CONFIG_EOF'",
        config_yaml(cfg).rstrip("\n"),
        "TAPO_CONFIG_EOF",
        f"mv {cfg_path}.tmp {cfg_path}",
        "fi",
        f"while [ ! -f {cfg_path} ]; do sleep 1; done",
        "nodes=( $(scontrol show hostnames \"$SLURM_JOB_NODELIST\") )",
    ]
    if lo.placement == "colocated":
        lines += [
            f"# colocated: all {spec.nodes} node(s) are trainer nodes; the rollout engines run on the trainer GPUs.",
            "keep_usr1 " + trainer_command(cfg_path, spec.nodes, spec.gpus_per_node, "$SLURM_NODEID", "${nodes[0]}"),
            "rc=$?",
            *requeue_lines(spec.requeue),
            "exit $rc",
        ]
        return "\n".join(lines) + "\n"
    en = cfg.launch.engine_nodes
    done = f"{run_dir}/.trainer_done.$SLURM_JOB_ID"
    per_node = spec.gpus_per_node // cfg.launch.engine_tp
    lines += [
        f"# separate: nodes 0..{en - 1} = engine pool ({lo.num_engines} SGLang servers x TP {lo.engine_tp}), "
        f"nodes {en}..{spec.nodes - 1} = trainer ({lo.trainer_gpus} ranks: TP {lo.tp} x PP {lo.pp} x DP {lo.dp})",
        f"ENGINE_NODES={en}",
        "urls=()",
        f"for ((n = 0; n < ENGINE_NODES; n++)); do for ((e = 0; e < {per_node}; e++)); do "
        f"urls+=(\"http://${{nodes[n]}}:$(({cfg.launch.engine_port} + e))\"); done; done",
        "export TAPO_ENGINE_URLS=$(IFS=,; echo \"${urls[*]}\")",
        "if [ \"$SLURM_NODEID\" -lt \"$ENGINE_NODES\" ]; then",
        "  pids=()",
    ]
    for cmd in engine_commands(cfg, spec):
        lines.append(f"  keep_usr1 env {cmd} & pids+=($!)")
    lines += [
        "  # serve until the trainer reports completion (engines never exit on their own)",
        f"  while [ ! -f {done} ]; do sleep 30; done",
        "  kill \"${pids[@]}\" 2>/dev/null; wait",
        "else",
        "  # the trainer connects to the pool (rollout.engine_urls) and broadcasts weights from the first trainer node",
        "  keep_usr1 " + trainer_command(cfg_path, spec.nodes - en, spec.gpus_per_node,
                                         "$((SLURM_NODEID - ENGINE_NODES))", "${nodes[ENGINE_NODES]}")
        + " \"rollout.engine_urls=[$TAPO_ENGINE_URLS]\" rollout.weight_sync_master_address=${nodes[ENGINE_NODES]}",
        "  rc=$?",
        f"  touch {done}",
        *("  " + line for line in requeue_lines(spec.requeue)),
        "  exit $rc",
        "fi",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- executors
def local_experiment(cfg: TrainConfig, out_dir: str | Path, nproc: int = 2, threads: int = 1):
    """A local torchrun job running ``tapo train`` on ``<out_dir>/config.yaml``; returns (experiment, config path)."""
    import nemo_run as run

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.yaml"
    cfg_path.write_text(config_yaml(cfg))
    env = job_env(cfg, JobSpec(), container=False)
    # torchrun and python from this interpreter's environment, whether or not it is activated
    env.update({"OMP_NUM_THREADS": str(threads), "WANDB_SILENT": "true",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    executor = run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun", env_vars=env)
    task = run.Script(path="tapo_megatron.commands", m=True, entrypoint="python", args=["train", "--config", str(cfg_path)])
    exp = run.Experiment(f"tapo-{cfg.logging.run_name or 'run'}", executor=executor,
                         base_dir=str(out_dir / "nemo_run"), clean_mode=True, enable_goodbye_message=False)
    with exp:
        exp.add(task, executor=executor, name="train")
    return exp, cfg_path


def slurm_tunnel(spec: JobSpec):
    """Where sbatch runs: this machine (a login node), or a login node over SSH from a workstation. The job
    directory must be on the cluster's shared filesystem; over SSH it is a path there and must be given."""
    import nemo_run as run

    if spec.ssh_host:
        if not (spec.ssh_user and spec.job_dir):
            raise ConfigError("--ssh-host needs --ssh-user and --job-dir (a folder on the cluster's shared "
                              "filesystem for NeMo-Run's sbatch scripts and logs)")
        return run.SSHTunnel(host=spec.ssh_host, user=spec.ssh_user, job_dir=spec.job_dir,
                             identity=spec.ssh_identity or None)
    return run.LocalTunnel(job_dir=spec.job_dir or str(Path(spec.runs_dir or ".").resolve() / "nemo_run"))


def slurm_experiment(cfg: TrainConfig, spec: JobSpec):
    """One sbatch job over all nodes; one task per node runs :func:`role_script` inside the container."""
    import nemo_run as run

    if not spec.container_image:
        raise ConfigError("--container-image is required for Slurm")
    executor = run.SlurmExecutor(
        account=spec.account, partition=spec.partition or None, time=spec.time, nodes=spec.nodes,
        ntasks_per_node=1, gpus_per_node=spec.gpus_per_node,
        exclusive=True, mem="0",  # whole nodes: all their GPUs, CPUs and memory (mem=0: all of it)
        signal=f"USR1@{spec.signal_lead_s}",  # to the job step (no B:), see SIGNAL_PRELUDE
        additional_parameters={"requeue": True} if spec.requeue else None,  # open_mode=append keeps the logs
        retries=spec.max_requeues if spec.requeue else 0,  # TORCHX_MAX_RETRIES in the batch script
        container_image=spec.container_image, container_mounts=container_mounts(spec),
        container_env=list(SECRET_ENV), env_vars=job_env(cfg, spec, container=True),
        packager=run.Packager(),  # the package is installed in the image; nothing to ship
        tunnel=slurm_tunnel(spec),
    )
    task = run.Script(inline=role_script(cfg, spec), entrypoint="bash")
    exp = run.Experiment(f"tapo-{cfg.logging.run_name}", executor=executor, clean_mode=True,
                         enable_goodbye_message=False)
    with exp:  # NeMo-Run only adds jobs inside the context; leaving it unlaunched submits nothing
        exp.add(task, executor=executor, name="rl")
    return exp


def docker_experiment(cfg: TrainConfig, spec: JobSpec):
    """One container on this host with all its GPUs: a single-node trainer (colocated engines)."""
    import nemo_run as run

    if not spec.container_image:
        raise ConfigError("--container-image is required for Docker")
    if cfg.launch.engine_placement != "colocated" or spec.nodes != 1:
        raise ConfigError("the Docker executor runs one node: use launch.engine_placement=colocated and --nodes 1")
    env = job_env(cfg, spec, container=True)
    env.update({k: os.environ[k] for k in SECRET_ENV if k in os.environ})
    executor = run.DockerExecutor(
        container_image=spec.container_image, num_gpus=spec.gpus_per_node, runtime="nvidia", ipc_mode="host",
        shm_size="64g", ulimits=["memlock:-1", "stack:67108864"], volumes=container_mounts(spec), env_vars=env,
        packager=run.Packager())
    run_dir = f"{CONTAINER_RUNS}/{cfg.logging.run_name}"
    body = (f"mkdir -p {run_dir} && cat > {run_dir}/config.yaml <<'TAPO_CONFIG_EOF'\n{config_yaml(cfg)}"
            f"TAPO_CONFIG_EOF\n"
            + trainer_command(f"{run_dir}/config.yaml", 1, spec.gpus_per_node, "0", "localhost") + "\n")
    task = run.Script(inline=body, entrypoint="bash")
    exp = run.Experiment(f"tapo-{cfg.logging.run_name}", executor=executor, clean_mode=True,
                         enable_goodbye_message=False)
    with exp:  # NeMo-Run only adds jobs inside the context; leaving it unlaunched submits nothing
        exp.add(task, executor=executor, name="rl")
    return exp


def _mask(env: dict) -> dict:
    return {k: ("***" if k in SECRET_ENV else v) for k, v in env.items()}


class _RecordingDockerClient:
    """Takes the place of docker-py's client: records what NeMo-Run's ``DockerContainer.run`` would start."""

    def __init__(self):
        self.calls = []
        self.networks = self
        self.containers = self

    def create(self, **kwargs):  # client.networks.create
        self.calls.append(("network", kwargs))

    def run(self, image, command, **kwargs):  # client.containers.run
        self.calls.append(("container", {"image": image, "command": command, **kwargs}))


def docker_run_args(req) -> tuple[list[str], list[str]]:
    """``docker run`` argv equivalent to what NeMo-Run 0.11.1 starts for a ``DockerJobRequest``: the volumes as its
    scheduler sets them (``DockerScheduler.schedule`` adds ``<job_dir>:/nemo_run``, where the packaged role
    script lives), then the docker-py keyword arguments of its own ``DockerContainer.run``, spelled as CLI flags.
    Returns (networks NeMo-Run creates first, argv)."""
    import copy

    from nemo_run.config import RUNDIR_NAME, RUNDIR_SPECIAL_NAME

    container = copy.deepcopy(req.containers[0])
    ex = container.executor
    ex.volumes = [v.replace(RUNDIR_SPECIAL_NAME, req.executor.job_dir, 1) for v in ex.volumes]
    ex.volumes.append(f"{req.executor.job_dir}:/{RUNDIR_NAME}")
    client = _RecordingDockerClient()
    container.run(client=client, id=req.id)
    kw = dict(next(c for kind, c in client.calls if kind == "container"))
    networks = [c["name"] for kind, c in client.calls if kind == "network"]
    args = ["docker", "run"] + (["--rm"] if kw.pop("remove", False) else []) + (["-d"] if kw.pop("detach", False) else [])
    args += ["--name", kw.pop("name"), "--hostname", kw.pop("hostname"), "--network", kw.pop("network") or "torchx"]
    if kw.get("runtime"):
        args += ["--runtime", kw["runtime"]]
    for dr in kw.get("device_requests") or []:
        args += ["--gpus", str(dr.count)]
    args += ["--ipc", kw["ipc_mode"]] if kw.get("ipc_mode") else []
    args += ["--shm-size", kw["shm_size"]] if kw.get("shm_size") else []
    for ul in kw.get("ulimits") or []:
        args += ["--ulimit", f"{ul.name}={ul.soft}:{ul.hard}"]
    args += ["--privileged"] if kw.get("privileged") else []
    for vol in kw["volumes"]:
        args += ["-v", vol]
    for k, v in _mask(kw["environment"]).items():
        args += ["-e", f"{k}={v}"]
    for k, v in kw.get("labels", {}).items():
        args += ["--label", f"{k}={v}"]
    args += ["--workdir", kw["working_dir"], kw["image"]] + shlex.split(kw["command"])
    return networks, args


def render_dryrun(exp, role: str) -> str:
    """The sbatch script (Slurm) or ``docker run`` command (Docker) of the experiment's job, then the role script."""
    with exp:
        exp.dryrun(log=False)
    job = exp.jobs[0]
    request = job._dryrun_info.request
    if hasattr(request, "materialize"):  # SlurmBatchRequest
        text = request.materialize()
    else:  # DockerJobRequest
        networks, args = docker_run_args(request)
        text = "".join(f"docker network create --driver bridge {n} 2>/dev/null || true\n" for n in networks)
        text += shlex.join(args)
    return f"{text}\n\n# ---- role script ----\n{role}"


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tapo launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("executor", choices=["local", "slurm", "docker"])
    p.add_argument("--recipe", required=True, help="packaged recipe name (tapo_megatron/recipes) or YAML path")
    p.add_argument("--preset", default="auto", help="parallelism preset (h100_1x8, h100_4x8), 'none', or 'auto': "
                                                    "the one matching --nodes x --gpus-per-node")
    p.add_argument("--nodes", type=int, default=None, help="default: the preset's")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: the preset's, else 8")
    p.add_argument("--dryrun", action="store_true", help="print the sbatch script / docker command, submit nothing")
    p.add_argument("--nproc", type=int, default=2, help="local: torchrun processes")
    p.add_argument("--out", default="runs/launch", help="local: folder for config.yaml and NeMo-Run's records")
    p.add_argument("--container-image", default=os.environ.get("TAPO_CONTAINER_IMAGE", ""))
    p.add_argument("--data-dir", default="", help="host folder with your own data sets, mounted at /data as "
                                                  "${TAPO_DATA} (the shipped sets need none)")
    p.add_argument("--models-dir", default="", help="host folder with HF + Megatron checkpoints, mounted at /models")
    p.add_argument("--runs-dir", default="", help="host folder for checkpoints, logs, exports, mounted at /runs")
    p.add_argument("--mount", action="append", default=[], help="extra host:container mount (repeatable)")
    p.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT", ""))
    p.add_argument("--partition", default=os.environ.get("SLURM_PARTITION", ""))
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--job-dir", default="", help="Slurm: NeMo-Run job folder on the shared filesystem (default: "
                                                 "<runs-dir>/nemo_run; required with --ssh-host)")
    p.add_argument("--signal-lead", type=int, default=300, help="Slurm: seconds before the time limit at which the "
                                                               "trainer gets SIGUSR1 to checkpoint (default 300)")
    p.add_argument("--no-requeue", action="store_true", help="Slurm: do not requeue after the time-limit signal")
    p.add_argument("--max-requeues", type=int, default=20, help="Slurm: requeues per job at most (default 20)")
    p.add_argument("--ssh-host", default=os.environ.get("TAPO_SSH_HOST", ""),
                   help="Slurm: submit through SSH to this login node (from a workstation)")
    p.add_argument("--ssh-user", default=os.environ.get("TAPO_SSH_USER", ""))
    p.add_argument("--ssh-identity", default="", help="Slurm: SSH private key file (default: the SSH agent)")
    p.add_argument("--engine-model", default="", help="SGLang --model-path (default: rollout.engine_model_path)")
    p.add_argument("--nccl-socket-ifname", default="")
    p.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for every task (repeatable)")
    p.add_argument("overrides", nargs="*", help="config overrides section.field=value")
    return p.parse_intermixed_args(argv)


def build(args: argparse.Namespace):
    """(experiment, text to print on --dryrun or None) for parsed arguments."""
    preset = None if args.preset == "none" else args.preset
    if preset == "auto":
        preset = preset_for(args.nodes, args.gpus_per_node or 8) if args.nodes else None
    nodes, gpus = args.nodes, args.gpus_per_node
    if preset:
        p = load_preset(preset)
        nodes, gpus = nodes or p["nodes"], gpus or p["gpus_per_node"]
    nodes, gpus = nodes or 1, gpus or 8
    cfg = resolve_recipe(args.recipe, preset, args.overrides)
    if args.executor == "local":
        exp, _ = local_experiment(cfg, args.out, nproc=args.nproc)
        return exp, None
    spec = JobSpec(nodes=nodes, gpus_per_node=gpus, container_image=args.container_image, data_dir=args.data_dir,
                   models_dir=args.models_dir, runs_dir=args.runs_dir, mounts=args.mount, account=args.account,
                   partition=args.partition, time=args.time, job_dir=args.job_dir, signal_lead_s=args.signal_lead,
                   requeue=not args.no_requeue, max_requeues=args.max_requeues, ssh_host=args.ssh_host, ssh_user=args.ssh_user,
                   ssh_identity=args.ssh_identity, engine_model=args.engine_model,
                   nccl_socket_ifname=args.nccl_socket_ifname,
                   env=dict(item.split("=", 1) for item in args.env))
    if args.executor == "slurm":
        role = role_script(cfg, spec)
        return slurm_experiment(cfg, spec), role
    exp = docker_experiment(cfg, spec)
    return exp, exp.jobs[0].task.inline


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    exp, role = build(args)
    if args.dryrun:
        if args.executor == "local":
            with exp:
                exp.dryrun(log=True)
        else:
            print(render_dryrun(exp, role))
        return 0
    with exp:
        exp.run(sequential=True, detach=args.executor == "slurm", tail_logs=args.executor == "local")
    return 0
