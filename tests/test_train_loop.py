"""The RL loop through ``train()`` itself: TAPO with the constructed prefix trained or not, periodic evaluation,
the HF export of the final checkpoint, and a killed run that resumes to the uninterrupted run's numbers."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loop_worker import loop_config  # noqa: E402

from tapo_megatron.logging.tracker import read_metrics  # noqa: E402
from tapo_megatron.train import TrainResult, train  # noqa: E402

WORKER = Path(__file__).with_name("_loop_worker.py")


@pytest.fixture(scope="module")
def prefix_runs(tmp_path_factory):
    """3 TAPO steps from the same start, the constructed trajectory's sampled prefix trained (True) or not."""
    runs = {}
    for trained in (True, False):
        out = tmp_path_factory.mktemp(f"prefix_{trained}")
        result = train(loop_config(out, 3, [f"tapo.train_constructed_prefix={str(trained).lower()}"]))
        runs[trained] = (result, read_metrics(out / "logs" / "metrics.jsonl"))
    return runs


def test_tapo_steps_construct_and_train(prefix_runs):
    for trained, (result, rows) in prefix_runs.items():
        assert isinstance(result, TrainResult) and result.actor.iteration == 3
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert all(r["tapo/num_candidates"] > 0 and r["traj/num_constructed"] > 0 for r in rows), trained
        assert all(r["skipped_nonfinite"] == 0.0 and r["loss"] is not None for r in rows)
        assert all(r["sync/bytes"] > 0 for r in rows)  # the engine got every step's weights


def test_untrained_prefix_leaves_the_sampled_tokens_out_of_the_loss(prefix_runs):
    with_prefix, without = prefix_runs[True][1], prefix_runs[False][1]
    first_with, first_without = with_prefix[0], without[0]
    # Step 1 samples from the same weights, so the rollouts and constructions are the same; only the mask differs.
    assert first_with["traj/num_constructed"] == first_without["traj/num_constructed"]
    assert first_without["num_tokens/constructed"] < first_with["num_tokens/constructed"]
    assert first_without["num_tokens/original"] == first_with["num_tokens/original"]
    assert first_without["loss"] != first_with["loss"]


def test_eval_interval_logs_eval_rows(tmp_path):
    train(loop_config(tmp_path, 3, ["eval_interval=2"]))
    rows = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    with_eval = [r["step"] for r in rows if "eval/heldout/greedy_accuracy" in r]
    assert with_eval == [2]
    row = rows[1]
    for key in ("eval/heldout/pass@1", "eval/heldout/pass@2", "eval/heldout/num_problems"):
        assert key in row, key
    assert row["eval/heldout/num_problems"] == 16.0


def test_final_checkpoint_exported_for_serving(tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(loop_config(tmp_path, 3, [f"checkpoint.save={tmp_path}/ckpt",
                                             f"checkpoint.export_hf={tmp_path}/hf"]))
    assert (tmp_path / "ckpt" / "iter_0000003" / "state.json").is_file()
    assert result.final_checkpoint == tmp_path / "ckpt" / "iter_0000003"
    hf_dir = tmp_path / "hf"
    assert (hf_dir / "config.json").is_file() and list(hf_dir.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tokens = torch.tensor([q.prompt_ids for q in result.task.evals["heldout"][:4]])
    with torch.no_grad():
        logits = model(tokens).logits.float()
    hf_lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    actor_lp, _ = result.actor.compute_logprobs(tokens)
    torch.testing.assert_close(actor_lp[:, 1:], hf_lp, atol=1e-4, rtol=0)


def test_killed_run_resumes_to_the_same_numbers(tmp_path, workers):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    workers.run(WORKER, straight, 4, "-", "checkpoint.save_interval=2")
    died = workers.run(WORKER, killed, 4, 3, "checkpoint.save_interval=2", check=False)
    assert died.returncode == 3, died.stderr[-3000:]  # died logging step 3; the step-2 checkpoint is the newest
    assert (killed / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    workers.run(WORKER, killed, 4, "-", "checkpoint.save_interval=2")
    ref = {r["step"]: r for r in read_metrics(straight / "logs" / "metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(killed / "logs" / "metrics.jsonl")}
    assert sorted(got) == [1, 2, 3, 4]  # no step lost, none doubled
    for step in (3, 4):
        for key in ("loss", "rollout/accuracy", "rollout/response_length", "traj/num_constructed", "grad_norm"):
            assert got[step][key] == ref[step][key], (step, key)
    a, b = torch.load(straight / "final.pt"), torch.load(killed / "final.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
