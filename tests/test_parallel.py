"""Every parallel layout against the single-rank result (2 gloo processes under torchrun, fp32):
TP=2 and PP=2 log-probs/entropies equal TP=1 within 1e-5; one training step at TP=2, PP=2 and DP=2 gives the
same loss and the same updated weights as the single rank on the same global batch. The single rank runs the plain
path (fixed micro-batches of full width, logits path); the layouts run with the token budget (ragged micro-batches
trimmed to their longest row, rows balanced over DP ranks) and TP=2 once more with the fused linear log-prob."""
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_parallel_worker.py")


def _run(workers, tp: int, pp: int, nproc: int, out: Path, *flags: str) -> dict:
    workers.run(WORKER, tp, pp, out, *flags, nproc=nproc)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single(workers, tmp_path_factory):
    return _run(workers, 1, 1, 1, tmp_path_factory.mktemp("single") / "out.pt")


@pytest.mark.parametrize("tp,pp,flags", [(2, 1, ("budget",)), (1, 2, ("budget",)), (1, 1, ("budget",)),
                                         (2, 1, ("fused",))], ids=["tp2", "pp2", "dp2", "tp2-fused"])
def test_layout_matches_single_rank(workers, single, tmp_path, tp, pp, flags):
    got = _run(workers, tp, pp, 2, tmp_path / "out.pt", *flags)
    # with lengths, positions past a row's end are not computed (0); the rest must match the full-width run
    valid = torch.arange(12)[None] < LENGTHS[:, None] if "budget" in flags else torch.ones(8, 12, dtype=torch.bool)
    for key in ("logprobs", "entropy"):
        torch.testing.assert_close(got[key], single[key] * valid, atol=1e-5, rtol=0)
    if "budget" in flags:  # ragged rows really were trimmed: far less padding than full-width rows (28 %)
        assert got["pad_fraction"] < 0.1 < 1 - LENGTHS.sum() / LENGTHS.numel() / 12
    assert abs(got["loss"] - single["loss"]) < 1e-6
    assert abs(got["grad_norm"] - single["grad_norm"]) < 1e-5 * max(1.0, single["grad_norm"])
    assert got["state"].keys() == single["state"].keys()
    for name, ref in single["state"].items():
        torch.testing.assert_close(got["state"][name], ref, atol=1e-6, rtol=1e-5, msg=name)
    # The step really moved the weights (so equality above is not vacuous).
    moved = max((single["state"][k] - v).abs().max().item() for k, v in _initial_state().items())
    assert moved > 1e-3


sys.path.insert(0, str(WORKER.parent))
from _parallel_worker import LENGTHS, SHAPE, hf_weights  # noqa: E402


def _initial_state():
    return hf_weights(SHAPE)
