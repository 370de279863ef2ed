"""tapo-megatron: TAPO / GRPO post-training of Qwen3 on Megatron-Core, with SGLang or native rollout engines.

Installs two import packages: ``tapo_megatron`` and the Triton kernels folder ``kernels/`` as ``tapo_kernels``
(never as a top-level ``kernels``, which transformers already uses). Dependencies are pinned in
requirements-cpu.txt (CPU: tests, CI, demo) and versions.env (GPU container); megatron-core is installed with
``--no-deps --ignore-requires-python`` (its metadata claims Python >= 3.12 though the cp311 wheel works), see the
Makefile.
"""
from setuptools import setup

setup(
    name="tapo-megatron",
    version="0.1.0",
    description="TAPO (Trajectory-Augmented Policy Optimization) RL post-training for Qwen3 on Megatron-Core",
    python_requires=">=3.11",
    packages=[
        "tapo_megatron", "tapo_megatron.config", "tapo_megatron.data", "tapo_megatron.rollout",
        "tapo_megatron.rewards", "tapo_megatron.trajectory", "tapo_megatron.algorithms", "tapo_megatron.training",
        "tapo_megatron.models", "tapo_megatron.convert", "tapo_megatron.parallel", "tapo_megatron.logging",
        "tapo_megatron.tasks", "tapo_megatron.recipes", "tapo_kernels",
    ],
    package_dir={"tapo_kernels": "kernels"},
    package_data={"tapo_megatron": ["recipes/*.yaml", "trajectory/templates/*.txt"]},
    entry_points={"console_scripts": ["tapo = tapo_megatron.cli:main"]},
)
