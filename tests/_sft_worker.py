"""Worker for tests/test_sft.py, run under torchrun (2 gloo ranks, TP=2):

    torchrun --nproc_per_node 2 tests/_sft_worker.py SFT_DATA RL_DATA OUT_DIR

1. ``tapo sft`` (``run_sft``) for a few steps on SFT_DATA at TP=2, saving a checkpoint in OUT_DIR/sft_ckpt;
2. an RL run (``train``) at TP=2 whose ``checkpoint.pretrained_checkpoint`` is that checkpoint, one step with lr=0
   (so its weights must still be the SFT weights afterwards);
3. ``mcore_to_hf`` of the SFT checkpoint (an independent read path); rank 0 writes OUT_DIR/result.json with the
   largest difference between the RL engine's weights and the converted SFT weights.
"""
import json
import sys
from pathlib import Path

import torch

from tapo_megatron.config import load_config
from tapo_megatron.convert.api import mcore_to_hf
from tapo_megatron.data.assets import data_file, qwen3_tokenizer_dir
from tapo_megatron.sft import run_sft
from tapo_megatron.train import train
from tapo_megatron.convert.checkpoints import resolve_checkpoint

MODEL = ["model.tokenizer=" + str(qwen3_tokenizer_dir()),
         "model.hf_config={vocab_size: 151936, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
         "num_attention_heads: 2, num_key_value_heads: 2, head_dim: 16, tie_word_embeddings: true}",
         "parallel.tensor_model_parallel_size=2", "parallel.micro_batch_size=2", "logging.wandb_mode=disabled",
         "logging.progress_bar=false", "seed=5"]


def main(sft_data: str, rl_data: str, out: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    sft_cfg = load_config(None, MODEL + [
        f"sft.data_file={sft_data}", "sft.global_batch_size=2", "sft.train_iters=4", "sft.length_bucketing=true",
        "sft.optimizer.lr=0.03", "sft.optimizer.lr_warmup_iters=0", "sft.optimizer.lr_decay_iters=0",
        f"checkpoint.save={out / 'sft_ckpt'}", f"logging.output_dir={out / 'sft'}"])
    run_sft(sft_cfg)
    rl_cfg = load_config(None, MODEL + [
        "data.task=math", f"data.train_file={rl_data}", "data.reward=math", "rollout.n_samples_per_prompt=2",
        "rollout.rollout_batch_size=2", "rollout.max_new_tokens=4", "optimizer.lr=0.0", "train_iters=1",
        f"checkpoint.pretrained_checkpoint={out / 'sft_ckpt'}", f"logging.output_dir={out / 'rl'}"])
    run = train(rl_cfg)
    hf_dir = mcore_to_hf(resolve_checkpoint(out / "sft_ckpt"), out / "sft_hf")
    if run.ctx.is_main:
        from safetensors.torch import load_file

        converted = {}
        for shard in sorted(hf_dir.glob("*.safetensors")):
            converted.update(load_file(shard))
        engine_state = run.engine._model.state_dict()
        diff = max((engine_state[k] - v).abs().max().item() for k, v in converted.items())
        (out / "result.json").write_text(json.dumps({"max_abs_diff": diff, "compared": len(converted),
                                                     "rl_metrics_file": str(out / "rl" / "metrics.jsonl")}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
