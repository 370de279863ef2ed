"""Ranks agree on faults: a NaN gradient on one data-parallel rank skips the step on all; a stop signal to one
rank stops all at the same step (2 gloo processes)."""
from pathlib import Path

WORKER = Path(__file__).with_name("_fault_ranks_worker.py")


def test_ranks_agree_on_a_nan_gradient_and_a_stop_signal(workers):
    out = workers.run(WORKER, nproc=2).stdout
    for rank in (0, 1):
        assert f"rank {rank}: skipped unchanged=True iteration=0 stopped=True" in out, out
