"""Versions are pinned once (versions.env): the Dockerfile only refers to them, and every package pinned in both the
container and requirements-cpu.txt / the Makefile has the same version."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _versions() -> dict[str, str]:
    out = {}
    for line in (REPO / "versions.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements-cpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def _var(package: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", package.upper()) + "_VERSION"


def test_dockerfile_versions_all_come_from_versions_env():
    versions = _versions()
    text = (REPO / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    # every pin in a RUN line is "pkg==${VAR}" with VAR from versions.env; no literal version anywhere
    pins = re.findall(r"([A-Za-z0-9_.\-\[\]]+)==(\S+?)[\"\s]", code)
    assert pins, "no pins found in the Dockerfile"
    for package, ref in pins:
        m = re.fullmatch(r"\$\{([A-Z0-9_]+)\}", ref)
        assert m, f"Dockerfile pins {package}=={ref} literally; use a versions.env variable"
        assert m.group(1) in versions, f"Dockerfile uses ${{{m.group(1)}}}, not defined in versions.env"
    for name in re.findall(r"\$\{([A-Z0-9_]+)\}", code):
        assert name in versions or name == "GIT_COMMIT" or name == "CUDA_IMAGE", name
    # build-arg defaults (the base image) equal versions.env
    for name, default in re.findall(r"^ARG ([A-Z0-9_]+)=(\S+)", code, flags=re.M):
        if name in versions:
            assert default == versions[name], f"Dockerfile ARG {name}={default} but versions.env says {versions[name]}"
    assert "versions.env" in code and ". /opt/tapo/versions.env" in code
    for component in ("torch==${TORCH_VERSION}", "transformer-engine[pytorch]==${TRANSFORMER_ENGINE_VERSION}",
                      "NVIDIA/apex", "megatron-core==${MEGATRON_CORE_VERSION}", "sglang==${SGLANG_VERSION}",
                      "pip install --no-deps --no-build-isolation -e /opt/tapo-megatron"):
        assert component in code, component


def test_versions_match_requirements_and_makefile():
    versions, reqs = _versions(), _requirements()
    cpu_only = {"torch": "TORCH_CPU_VERSION", "triton": "TRITON_CPU_VERSION"}  # CPU wheels differ from the GPU pins
    checked = 0
    for package, version in reqs.items():
        var = cpu_only.get(package, _var(package))
        if var in versions:
            assert versions[var] == version, f"requirements-cpu.txt {package}=={version} but versions.env {var}=" \
                                             f"{versions[var]}"
            checked += 1
    assert checked >= 14, checked
    for var in versions:  # every Python package pinned for the container and also used on CPU agrees
        if var.endswith("_VERSION") and not var.startswith(("TORCH", "TRITON", "TRANSFORMER_ENGINE", "SGLANG",
                                                             "MEGATRON")):
            package = var.removesuffix("_VERSION").lower().replace("_", "-")
            assert reqs.get(package) == versions[var], f"versions.env {var}={versions[var]} vs requirements " \
                                                       f"{package}=={reqs.get(package)}"
    make = (REPO / "Makefile").read_text()
    assert f"megatron-core=={versions['MEGATRON_CORE_VERSION']}" in make


def test_dockerignore_keeps_environments_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "runs", "**/__pycache__"):
        assert path in ignored
