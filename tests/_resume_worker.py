"""Worker for tests/test_resume.py: SFT a tiny Qwen3 for 4 steps, checkpointing every step.

    python tests/_resume_worker.py OUT_DIR [KILL_AT_STEP]

With KILL_AT_STEP the process dies abruptly (os._exit) inside that step, after the previous step's checkpoint was
written; running again without it resumes from the checkpoint. Rank 0 writes the final weights to OUT_DIR/final.pt.
"""
import os
import sys

import torch

from tapo_megatron.config import load_config
from tapo_megatron.sft import run_sft
from tapo_megatron.training.weight_sync import gather_hf_state

TINY = {"vocab_size": 20, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "max_position_embeddings": 128}


def main(out: str, kill_at: int | None) -> None:
    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.hf_config={TINY}", "sft.train_iters=4", "sft.global_batch_size=8",
                             "parallel.micro_batch_size=4", "parallel.max_tokens_per_micro_batch=160",
                             "sft.optimizer.lr=3e-3", f"checkpoint.save={out}/ckpt",
                             "checkpoint.save_interval=1", f"logging.output_dir={out}/logs",
                             "logging.wandb_mode=disabled", "logging.progress_bar=false"])

    actor = run_sft(cfg, on_step=(lambda step, actor: os._exit(3) if step == kill_at else False))
    state = gather_hf_state(actor)
    if actor.ctx.rank == 0:
        torch.save(state, os.path.join(out, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
