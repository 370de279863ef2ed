"""Versions are pinned once (versions.env): the Dockerfile and requirements-image.txt only refer to them, and every
package pinned in both the container and requirements-cpu.txt / the Makefile has the same version (or a declared
``*_CPU_VERSION`` where the CPU wheel differs). Whether the image layer resolves is `make image-check` (network)."""
from __future__ import annotations

import os
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
    for component in ("requirements-image.txt", "pip install -r /opt/tapo/requirements-image.txt",
                      "transformer-engine-torch==${TRANSFORMER_ENGINE_VERSION}", "--branch ${APEX_REF}",
                      "NVIDIA/apex", "set -a && . /opt/tapo/versions.env && set +a",
                      "pip install --no-deps --no-build-isolation -e /opt/tapo-megatron"):
        assert component in code, component
    assert "index-url" not in code  # one index: the one image-check resolves against


def test_image_requirements_use_versions_env():
    versions = _versions()
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements-image.txt").read_text().splitlines()]
    pins = {}
    for line in filter(None, lines):
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[a-z0-9,\-]+\])?(==\$\{([A-Z0-9_]+)\}|>=[0-9.]+)?", line)
        assert m, f"requirements-image.txt: {line!r} is neither unpinned nor pkg==${{VAR}}"
        if m.group(4):
            assert m.group(4) in versions, f"{line}: {m.group(4)} is not in versions.env"
            pins[m.group(1).lower()] = m.group(4)
    for package, var in {"torch": "TORCH_VERSION", "triton": "TRITON_VERSION", "sglang": "SGLANG_VERSION",
                         "megatron-core": "MEGATRON_CORE_VERSION", "transformers": "TRANSFORMERS_VERSION",
                         "transformer-engine": "TRANSFORMER_ENGINE_VERSION"}.items():
        assert pins.get(package) == var, package
    # the CUDA 13 core wheel comes from its own extra; [pytorch] would pull the sdist-only transformer-engine-torch
    assert "transformer-engine[core-cu13]==${TRANSFORMER_ENGINE_VERSION}" in lines
    assert versions["TRANSFORMER_ENGINE_VERSION"] != "2.20.0"  # not on the registry (2.19.0 and 2.20.2 are)


def test_versions_match_requirements_and_makefile():
    versions, reqs = _versions(), _requirements()
    # CPU wheels differ from the GPU pins where versions.env says so (*_CPU_VERSION)
    cpu_only = {k.removesuffix("_CPU_VERSION").lower(): k for k in versions if k.endswith("_CPU_VERSION")}
    checked = 0
    for package, version in reqs.items():
        var = cpu_only.get(package, _var(package))
        if var in versions:
            assert versions[var] == version, f"requirements-cpu.txt {package}=={version} but versions.env {var}=" \
                                             f"{versions[var]}"
            checked += 1
    assert checked >= 14, checked
    for var in versions:  # every Python package pinned for the container and also used on CPU agrees
        if var.endswith("_VERSION") and not var.endswith("_CPU_VERSION") and not var.startswith(
                ("TORCH", "TRITON", "TRANSFORMER_ENGINE", "SGLANG", "MEGATRON")):
            package = var.removesuffix("_VERSION").lower().replace("_", "-")
            want = versions.get(var.replace("_VERSION", "_CPU_VERSION"), versions[var])
            assert reqs.get(package) == want, f"versions.env {var}={versions[var]} vs requirements " \
                                                       f"{package}=={reqs.get(package)}"
    make = (REPO / "Makefile").read_text()
    assert f"megatron-core=={versions['MEGATRON_CORE_VERSION']}" in make


def test_dockerignore_keeps_environments_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "runs", "**/__pycache__"):
        assert path in ignored


def test_image_check_platforms_and_sdist_requirements():
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_check", REPO / "ops" / "image_check.py")
    ic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ic)
    tags = ic.platforms("2.39")
    # pip does not widen --platform: nvidia-nccl-cu13 (torch's dependency) ships manylinux_2_18 only
    assert tags[0] == "manylinux_2_39_x86_64" and "manylinux_2_18_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_40_x86_64" not in tags
    resolved = {"torch": "2.14.1", "transformer-engine-cu13": "2.20.2", "einops": "0.8.2"}
    assert ic.unmet(["torch>=2.1", "einops", "transformer_engine_cu13==2.20.2"], resolved) == []
    assert ic.unmet(["torch>=2.15", "onnx"], resolved) == ["torch>=2.15 (resolved: 2.14.1)", "onnx (resolved: None)"]
    env = ic.registry_env({"TORCH_VERSION": "2.14.1"})
    assert env["PIP_CONFIG_FILE"] == os.devnull and "PIP_FIND_LINKS" not in env and env["TORCH_VERSION"] == "2.14.1"
