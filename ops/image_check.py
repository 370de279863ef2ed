"""``make image-check``: does the GPU image's Python layer resolve, without building the image or installing it?

1. ``requirements-image.txt`` (versions from versions.env) is resolved by pip against the package registry for the
   image's interpreter and platform: CPython ``IMAGE_PYTHON``, manylinux x86_64 up to glibc ``IMAGE_GLIBC``, wheels
   only (``pip install --dry-run --report``; pip reads wheel metadata only, nothing is installed). This machine's
   pip configuration (local wheel folders, constraint files) is switched off so the answer is the registry's;
   ``PIP_INDEX_URL`` is honoured for a mirror.
2. transformer-engine-torch is sdist only: its sdist must exist at the TE pin and the requirements it declares
   (``*.egg-info/requires.txt``) must be met by the resolved set.
3. NVIDIA apex comes from git (``APEX_REF``): checked with ``git ls-remote`` when github.com is reachable, otherwise
   reported as not checked. Its extensions' build is not checked here.
4. The Dockerfile is linted with hadolint when it is installed (Debian: ``apt-get install hadolint``).

Prints one line per check and exits 1 if any failed. ``--report PATH`` keeps pip's JSON report.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INDEX = "https://pypi.org/simple"


def read_versions(path: Path = REPO / "versions.env") -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def platforms(glibc: str) -> list[str]:
    """pip does not widen ``--platform``: list every manylinux tag a glibc ``2.N`` system accepts."""
    minor = int(glibc.split(".")[1])
    tags = [f"manylinux_2_{m}_x86_64" for m in range(minor, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def machine_pip_setting(key: str) -> str:
    """One value of this machine's pip configuration ("" when unset)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def registry_env(versions: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT")}
    # A registry mirror and CA bundle configured on the machine are the registry (a CI proxy): keep those two.
    index, cert = machine_pip_setting("global.index-url"), machine_pip_setting("global.cert")
    if "PIP_INDEX_URL" not in env and index.startswith(("http://", "https://")):
        env["PIP_INDEX_URL"] = index
    if "PIP_CERT" not in env and cert:
        env["PIP_CERT"] = cert
    env["PIP_CONFIG_FILE"] = os.devnull  # no other config: the registry, not this machine's wheel folders
    env.update(versions)  # requirements-image.txt's ${VAR}s
    return env


def resolve(versions: dict[str, str], report: Path, env: dict[str, str]) -> dict[str, str]:
    """pip's dry-run resolution of requirements-image.txt; returns {canonical name: version}."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), "--python-version", versions["IMAGE_PYTHON"], "--implementation", "cp",
           "--only-binary=:all:", "--target", str(report.parent / "target"),
           "-r", str(REPO / "requirements-image.txt")]
    for tag in platforms(versions["IMAGE_GLIBC"]):
        cmd += ["--platform", tag]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("INFO:"))[-3000:]
        raise SystemExit(f"FAIL resolve: pip could not resolve requirements-image.txt for CPython "
                         f"{versions['IMAGE_PYTHON']} manylinux x86_64 (glibc {versions['IMAGE_GLIBC']}):\n{tail}")
    data = json.loads(report.read_text())
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}


def sdist_requires(index: str, name: str, version: str) -> list[str]:
    """The install requirements an sdist declares in its egg-info (read from the tarball, nothing is built)."""
    page = urllib.request.urlopen(f"{index.rstrip('/')}/{canonicalize_name(name)}/", timeout=60).read().decode()
    stem = f"{name.replace('-', '_')}-{version}.tar.gz"
    links = [h for h in re.findall(r'href="([^"]+)"', page) if h.split("#")[0].endswith("/" + stem)]
    if not links:
        raise LookupError(f"{stem} is not on {index}")
    data = urllib.request.urlopen(links[0].split("#")[0], timeout=120).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(".egg-info/requires.txt")), None)
        if member is None:
            raise LookupError(f"{stem} declares no requires.txt")
        text = tar.extractfile(member).read().decode()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("[")]


def unmet(requires: list[str], resolved: dict[str, str]) -> list[str]:
    bad = []
    for spec in requires:
        req = Requirement(spec)
        got = resolved.get(canonicalize_name(req.name))
        if got is None or (req.specifier and not req.specifier.contains(got, prereleases=True)):
            bad.append(f"{spec} (resolved: {got})")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", default="", help="keep pip's JSON report here")
    args = p.parse_args(argv)
    versions = read_versions()
    env = registry_env(versions)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(args.report).resolve() if args.report else Path(tmp) / "report.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        resolved = resolve(versions, report, env)
    print(f"PASS resolve: {len(resolved)} packages for CPython {versions['IMAGE_PYTHON']} manylinux x86_64 "
          f"(glibc {versions['IMAGE_GLIBC']}): torch {resolved.get('torch')}, triton {resolved.get('triton')}, "
          f"transformer-engine-cu13 {resolved.get('transformer-engine-cu13')}, sglang {resolved.get('sglang')}, "
          f"megatron-core {resolved.get('megatron-core')}, flash-attn-4 {resolved.get('flash-attn-4')}")
    for name, var in (("torch", "TORCH_VERSION"), ("triton", "TRITON_VERSION"), ("numpy", "NUMPY_VERSION"),
                      ("transformer-engine-cu13", "TRANSFORMER_ENGINE_VERSION")):
        if resolved.get(name) != versions[var]:
            failed.append(f"{name} resolved to {resolved.get(name)}, versions.env {var}={versions[var]}")
    index = env.get("PIP_INDEX_URL", DEFAULT_INDEX)
    te = versions["TRANSFORMER_ENGINE_VERSION"]
    try:
        bad = unmet(sdist_requires(index, "transformer-engine-torch", te), resolved)
        if bad:
            failed.append(f"transformer-engine-torch {te} (sdist) needs {', '.join(bad)}")
        else:
            print(f"PASS transformer-engine-torch {te}: sdist on the registry; its declared requirements are met "
                  f"(its CUDA extension is built in the image, not here)")
    except (OSError, LookupError) as e:
        failed.append(f"transformer-engine-torch {te}: {e}")
    ref = versions["APEX_REF"]
    try:
        out = subprocess.run(["git", "ls-remote", "--tags", "https://github.com/NVIDIA/apex", ref],
                             capture_output=True, text=True, timeout=20, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        if out.returncode == 0 and ref in out.stdout:
            print(f"PASS apex: tag {ref} exists on github.com/NVIDIA/apex (its build is not checked here)")
        elif out.returncode == 0:
            failed.append(f"apex: no tag {ref} on github.com/NVIDIA/apex")
        else:
            print(f"NOT CHECKED apex {ref}: github.com unreachable from here; the image build clones it")
    except (OSError, subprocess.TimeoutExpired):
        print(f"NOT CHECKED apex {ref}: github.com unreachable from here; the image build clones it")
    lint = shutil.which("hadolint")
    if lint:
        out = subprocess.run([lint, str(REPO / "Dockerfile")], capture_output=True, text=True)
        if out.returncode:
            failed.append("hadolint:\n" + out.stdout + out.stderr)
        else:
            print("PASS hadolint Dockerfile")
    else:
        print("NOT CHECKED hadolint: not installed (apt-get install hadolint)")
    for f in failed:
        print(f"FAIL {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
