"""Cluster launch: ``tapo plan`` (per-GPU memory of a layout, ``plan``) and ``tapo launch`` (NeMo-Run experiments on
local, Slurm and Docker executors, ``experiment``). Read by nothing in the training loop."""
