"""Packaging: the wheel holds every subpackage and data file, and a non-editable install works on its own.

The wheel is built (``pip wheel --no-build-isolation``, like the Makefile's install) from a copy of the files git
would commit -- tracked plus untracked-but-not-ignored -- so neither build/ nor egg-info leftovers land in the repo,
and no git-ignored file (a developer's built tokenizer, bytecode) can leak into the wheel. It is then installed into a
fresh venv that sees the dependencies of the current environment but not this project's editable install, and every
module of ``tapo_megatron`` and ``tapo_kernels`` is imported there, and ``tapo --help`` is run.
"""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = "tapo_megatron"
KERNELS_DIR = "kernels"  # installed as the import package tapo_kernels (setup.py package_dir)
KERNELS_PKG = "tapo_kernels"
# Built at run time and git-ignored; a developer's copy must never be packaged (setup.py exclude_package_data).
RUNTIME_BUILT = (f"{PKG}/data/files/qwen3_tokenizer/tokenizer.json",)

TAIL = 6000


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env.pop("VIRTUAL_ENV", None)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _run(cmd: list[str], *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return (f"command: {' '.join(map(str, proc.args))}\nexit code: {proc.returncode}\n"
            f"--- stdout (tail) ---\n{proc.stdout[-TAIL:]}\n--- stderr (tail) ---\n{proc.stderr[-TAIL:]}")


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, _explain(proc)
    return proc


def _git_files(*args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", *args], capture_output=True, text=True,
                         check=True).stdout
    return sorted({p for p in out.split("\0") if p})


def _is_bytecode(rel: str) -> bool:
    return "__pycache__" in rel.split("/") or rel.endswith((".pyc", ".pyo"))


@pytest.fixture(scope="module")
def source_files() -> list[str]:
    """Files git would commit (tracked + untracked-not-ignored) that exist in the work tree, repo-relative."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files ship")
    files = _git_files("--cached", "--others", "--exclude-standard")
    return [p for p in files if (REPO / p).is_file() and not _is_bytecode(p)]


@pytest.fixture(scope="module")
def ignored_files() -> list[str]:
    """Git-ignored files under the packages in the real work tree (bytecode aside), plus the known run-time ones."""
    ignored = _git_files("--others", "--ignored", "--exclude-standard", "--", PKG, KERNELS_DIR)
    return sorted({p for p in ignored if not _is_bytecode(p)} | set(RUNTIME_BUILT))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def wheel(workdir: Path, source_files: list[str], ignored_files: list[str]) -> Path:
    src = workdir / "src"
    for rel in source_files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    # Stand-ins for a developer's git-ignored build outputs (a real tokenizer.json is ~11 MB; content is irrelevant):
    # they sit where the package_data globs would pick them up, and the wheel must still not contain them.
    for rel in ignored_files:
        if rel.startswith(f"{PKG}/"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text("{}\n")
    dist = workdir / "dist"
    _check(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                 "--disable-pip-version-check", str(src), "-w", str(dist)], cwd=workdir))
    wheels = sorted(dist.glob("tapo_megatron-*.whl"))
    assert len(wheels) == 1, f"expected one tapo_megatron wheel in {dist}, found {[w.name for w in dist.iterdir()]}"
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _package_dirs(source_files: list[str], root: str) -> set[str]:
    """Every folder under ``root`` that holds a .py file (each must be a package)."""
    return {str(Path(p).parent.as_posix()) for p in source_files if p.startswith(f"{root}/") and p.endswith(".py")}


def test_every_source_folder_is_a_package_in_the_wheel(source_files, wheel_names):
    shipped = set(source_files)
    dirs = _package_dirs(source_files, PKG)
    assert PKG in dirs
    no_init = sorted(d for d in dirs if f"{d}/__init__.py" not in shipped)
    assert not no_init, f"folders holding .py files but no __init__.py (not packages, so not installed): {no_init}"
    missing = sorted(d for d in dirs if f"{d}/__init__.py" not in wheel_names)
    assert not missing, f"packages missing from the wheel: {missing}"
    missing_modules = sorted(p for p in shipped if p.startswith(f"{PKG}/") and p.endswith(".py")
                             and p not in wheel_names)
    assert not missing_modules, f"modules missing from the wheel: {missing_modules}"


def test_kernels_ship_as_tapo_kernels(source_files, wheel_names):
    modules = [p for p in source_files if p.startswith(f"{KERNELS_DIR}/") and p.endswith(".py")]
    assert f"{KERNELS_DIR}/__init__.py" in modules
    expected = {KERNELS_PKG + p[len(KERNELS_DIR):] for p in modules}
    missing = sorted(expected - wheel_names)
    assert not missing, f"tapo_kernels modules missing from the wheel: {missing}"
    assert not any(n.startswith(f"{KERNELS_DIR}/") for n in wheel_names), "kernels/ must ship only as tapo_kernels"


def test_every_data_file_ships(source_files, wheel_names):
    data = [p for p in source_files if p.startswith(f"{PKG}/") and not p.endswith(".py")]
    assert any(p.startswith(f"{PKG}/recipes/") and p.endswith(".yaml") for p in data), "no recipes found"
    assert any(p.startswith(f"{PKG}/trajectory/templates/") for p in data), "no trajectory templates found"
    missing = sorted(p for p in data if p not in wheel_names)
    assert not missing, f"git-tracked data files missing from the wheel (add them to setup.py package_data): {missing}"


def test_nothing_ignored_ships(ignored_files, wheel_names):
    leaked = sorted(p for p in ignored_files if p in wheel_names)
    assert not leaked, f"git-ignored files in the wheel: {leaked}"
    bytecode = sorted(n for n in wheel_names if _is_bytecode(n))
    assert not bytecode, f"bytecode in the wheel: {bytecode}"
    strays = sorted(n for n in wheel_names
                    if not n.startswith((f"{PKG}/", f"{KERNELS_PKG}/", "tapo_megatron-")))
    assert not strays, f"unexpected top-level entries in the wheel: {strays}"


def _console_scripts(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as zf:
        [ep_name] = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(ep_name).decode()
    cfg = configparser.ConfigParser(delimiters=("=",))
    cfg.optionxform = str
    cfg.read_string(text)
    return dict(cfg["console_scripts"]) if cfg.has_section("console_scripts") else {}


@pytest.fixture(scope="module")
def venv(workdir: Path, wheel: Path) -> Path:
    """A fresh venv of this interpreter with the wheel installed (non-editable), then given the deps of this env."""
    root = workdir / "venv"
    _check(_run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=workdir))
    py = root / "bin" / "python"
    probe = ("import sys, sysconfig; print(sys.implementation.name, '%d.%d.%d' % sys.version_info[:3]); "
             "print(sysconfig.get_path('purelib'))")
    out = _check(_run([py, "-c", probe], cwd=workdir)).stdout.splitlines()
    me = f"{sys.implementation.name} {'%d.%d.%d' % sys.version_info[:3]}"
    assert out[0] == me, f"fresh venv runs {out[0]}, the tests run {me}"
    site = Path(out[1])
    assert site.is_dir() and root in site.parents, f"fresh venv site-packages {site} not inside {root}"
    # Install before exposing this env's site-packages, so pip cannot see the editable tapo-megatron there (and
    # decide it is "already satisfied", or touch it).
    _check(_run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index",
                 "--disable-pip-version-check", "--no-compile", str(wheel)], cwd=workdir))
    # A plain path line: the directory is appended to sys.path, but .pth files inside it are not processed, so the
    # editable finder (__editable__*.pth) stays inactive while the dependencies (torch, megatron, ...) import.
    (site / "_tapo_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return root


IMPORT_ALL = r"""
import importlib, importlib.util, os, pkgutil, sys, traceback
venv = os.path.realpath(sys.argv[1])
failures = {}  # module name -> traceback (a package that fails is reported once, not again by walk_packages)
for top in ("tapo_megatron", "tapo_kernels"):
    pkg = importlib.import_module(top)
    where = os.path.realpath(pkg.__file__)
    if not where.startswith(venv + os.sep):
        print(f"{top} imported from {where}, not from the fresh venv {venv}")
        sys.exit(2)
    names = [top]
    def onerror(name):
        failures.setdefault(name, traceback.format_exc())
    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, top + ".", onerror=onerror)]
    for name in names:
        try:
            if name.endswith(".__main__"):  # runs its command when imported: only find and compile it
                spec = importlib.util.find_spec(name)
                compile(spec.loader.get_source(name), spec.origin, "exec")
                continue
            importlib.import_module(name)
        except BaseException:
            failures.setdefault(name, traceback.format_exc())
    print(f"{top}: {len(names)} modules")
for name, tb in failures.items():
    print(f"=== FAILED: {name}\n" + "\n".join(tb.rstrip().splitlines()[-12:]))
if failures:  # the summary last, so that it survives the tail shown by the test
    print(f"=== {len(failures)} module(s) failed to import:")
    for name, tb in failures.items():
        print(f"  {name}: {tb.rstrip().splitlines()[-1]}")
sys.exit(1 if failures else 0)
"""


def test_installed_wheel_imports_every_module(venv: Path, workdir: Path):
    proc = _run([venv / "bin" / "python", "-c", IMPORT_ALL, venv], cwd=workdir, timeout=300)
    assert proc.returncode == 0, _explain(proc)


def test_installed_console_script_runs(venv: Path, wheel: Path, workdir: Path):
    scripts = _console_scripts(wheel)
    assert "tapo" in scripts, f"no `tapo` console script in the wheel's entry_points.txt: {scripts}"
    exe = venv / "bin" / "tapo"
    assert exe.is_file(), f"{exe} not installed (entry point {scripts['tapo']})"
    proc = _run([exe, "--help"], cwd=workdir, timeout=300)
    assert proc.returncode == 0, _explain(proc)
    for sub in ("train", "eval"):
        assert sub in proc.stdout, f"`tapo --help` does not list `{sub}`\n" + _explain(proc)
