"""The actor's training gradient against an independent implementation: transformers' Qwen3 with the same weights,
the same ragged batch and the same token-mean loss. The actor runs its real path (rows sorted and trimmed per
micro-batch under a token budget, several micro-batches, sequence-first logits with the in-place backward, or the
fused linear log-prob); the loss and the gradient norm (before clipping) must match HF's."""
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from _parallel_worker import SHAPE, hf_weights
from tapo_megatron.config import OptimizerConfig, ParallelConfig
from tapo_megatron.parallel import init_parallel
from tapo_megatron.training.actor import MegatronActor


@pytest.mark.parametrize("path", ["logits", "fused_linear"])
def test_loss_and_grad_norm_match_transformers(path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    b, t = 6, 14
    tokens = torch.randint(0, SHAPE.vocab_size, (b, t), generator=g)
    lengths = torch.tensor([14, 5, 9, 12, 7, 14])
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths.tolist()):
        mask[i, 3:n] = 1.0
    n_tokens = float(mask.sum())
    weights = torch.rand(b, t, generator=g)  # a per-token weight, like advantages

    actor = MegatronActor(SHAPE, init_parallel(1, 1, seed=1), OptimizerConfig(clip_grad=0.0),
                          ParallelConfig(micro_batch_size=2, max_tokens_per_micro_batch=30), logprobs_path=path)
    state = hf_weights(SHAPE)
    actor.load_hf_state(state)
    result = actor.train_step({"tokens": tokens, "loss_mask": mask, "w": weights, "lengths": lengths},
                              lambda lp, mb: (-(lp * mb["loss_mask"] * mb["w"]).sum() / n_tokens, {}))

    hf_cfg = Qwen3Config(**{k: v for k, v in SHAPE.to_hf().items() if k not in ("architectures", "torch_dtype")})
    hf = Qwen3ForCausalLM(hf_cfg)
    hf.load_state_dict(state, strict=False)
    attn = (torch.arange(t)[None] < lengths[:, None]).long()
    logits = hf(input_ids=tokens, attention_mask=attn).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    loss = -(lp * mask[:, 1:] * weights[:, 1:]).sum() / n_tokens
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf.parameters() if p.grad is not None))
    assert abs(result.loss - float(loss)) < 1e-5
    assert abs(result.grad_norm - float(grad_norm)) < 1e-4 * float(grad_norm)
    assert result.metrics["batch/pad_fraction"] < 0.15  # trimmed: full width would pad 1 - 61 / 84 = 27 %
