"""Worker for tests/test_train_loop.py: the RL loop (``train()``) on the arithmetic demo config, shrunk to seconds.

    python tests/_loop_worker.py OUT_DIR STEPS [KILL_AT_STEP] [override ...]

With KILL_AT_STEP the process dies abruptly (os._exit(3)) when the loop logs that step, before anything of it is
saved; running again without it resumes from the newest checkpoint. Rank 0 writes the final HF-named weights to
OUT_DIR/final.pt.
"""
import os
import sys

import torch

# A reward plug-in (looked up as "_loop_worker:parity_reward"): a random-init model never answers the arithmetic
# task correctly, so the task's exact reward would give no group any signal; the parity of the response length gives
# groups with correct and wrong members, so DCS, construction, splicing and DAE all run.
def parity_reward(response: str, gold: str) -> float:
    return float(len(response) % 2 == 0)


def loop_config(out: str, steps: int, overrides=()):
    from tapo_megatron.config import load_config
    from tapo_megatron.recipes import RECIPES_DIR

    return load_config(RECIPES_DIR / "demo.yaml", [
        f"train_iters={steps}", "rollout.rollout_batch_size=8", "rollout.n_samples_per_prompt=8",
        "rollout.max_new_tokens=24", "data.num_train_problems=200", "data.num_eval_problems=16",
        "data.eval_samples=2", "data.reward=_loop_worker:parity_reward", "tapo.enabled=true",
        "tapo.constructor=step_verifier", "algorithm.advantage_estimator=dae", "logging.wandb_mode=disabled",
        "logging.progress_bar=false", f"logging.output_dir={out}/logs", *overrides])


def main(out: str, steps: int, kill_at: int | None, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    from tapo_megatron.logging.tracker import MetricsLogger
    from tapo_megatron.train import train
    from tapo_megatron.training.weight_sync import gather_hf_state

    if kill_at is not None:
        log = MetricsLogger.log

        def log_or_die(self, step, metrics):
            if step == kill_at:
                os._exit(3)
            log(self, step, metrics)

        MetricsLogger.log = log_or_die
    result = train(loop_config(out, steps, [f"checkpoint.save={out}/ckpt", *overrides]))
    state = gather_hf_state(result.actor)
    if result.ctx.rank == 0:
        torch.save(state, os.path.join(out, "final.pt"))


if __name__ == "__main__":
    kill = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    main(sys.argv[1], int(sys.argv[2]), kill, sys.argv[4:])
