"""tapo-megatron: TAPO / GRPO post-training of Qwen3 on Megatron-Core, with SGLang or native rollout engines.

Installs two import packages: ``tapo_megatron`` and the Triton kernels folder ``kernels/`` as ``tapo_kernels``
(never as a top-level ``kernels``, which transformers already uses). Dependencies are pinned in
requirements-cpu.txt (CPU: tests, CI, demo) and versions.env (GPU container); megatron-core is installed with
``--no-deps --ignore-requires-python`` (its metadata claims Python >= 3.12 though the cp311 wheel works), see the
Makefile.

Packages are found automatically (every folder under ``tapo_megatron/`` with an ``__init__.py``), and the
non-Python files that ship with them are listed by glob below; tests/test_packaging.py builds the wheel and checks
that it holds every subpackage and data file, then installs it (non-editable) into a fresh venv and imports every
module. Builds work with ``pip install --no-build-isolation`` (setuptools >= 70.1 builds wheels without ``wheel``).
"""
from setuptools import find_packages, setup

setup(
    name="tapo-megatron",
    version="0.1.0",
    description="TAPO (Trajectory-Augmented Policy Optimization) RL post-training for Qwen3 on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["tapo_megatron", "tapo_megatron.*"]) + ["tapo_kernels"],
    package_dir={"tapo_kernels": "kernels"},
    # Recursive globs (``**``) need setuptools >= 62.3. Directories matched by a glob are skipped; only files ship.
    package_data={
        "tapo_megatron": [
            "recipes/*.yaml",
            "trajectory/templates/*.txt",
            "data/files/*",
            "data/files/**/*",
        ],
    },
    # fnmatch patterns ("*" also crosses "/"), relative to the package folder. The Qwen3 tokenizer.json is built at
    # run time and git-ignored: a developer's built copy must never be packaged. Nor may bytecode caches.
    exclude_package_data={
        "tapo_megatron": [
            "data/files/qwen3_tokenizer/tokenizer.json",
            "*__pycache__*",
            "*.pyc",
            "*.pyo",
        ],
    },
    # `tapo` (and `python -m tapo_megatron.commands`, what torchrun and NeMo-Run launch).
    entry_points={"console_scripts": ["tapo = tapo_megatron.commands:main"]},
)
