"""Checkpoint conversion between HF Qwen3 and Megatron-Core, and the HF-named weight export used by weight sync.

* ``qwen3``: the name/layout mapping (one place), ``export_hf_weights`` (Megatron stage -> HF-named buckets) and
  ``load_hf_weights`` (HF tensors -> this rank's Megatron shard).
* ``hf_io``: streaming safetensors reading/writing and tokenizer/generation-config copying.
* ``mcore_writer``: writes a Megatron torch_dist checkpoint chunk by chunk from HF shards, without a model.
* ``cli``: ``hf_to_mcore`` / ``mcore_to_hf`` (the ``tapo convert`` subcommands call these).
"""
from tapo_megatron.convert.api import hf_to_mcore, load_mcore_checkpoint, mcore_to_hf, read_ckpt_shape
from tapo_megatron.convert.hf_io import ConversionError, HFCheckpointReader, HFShardWriter, copy_hf_assets
from tapo_megatron.convert.qwen3 import export_hf_weights, load_hf_weights

__all__ = [
    "ConversionError", "HFCheckpointReader", "HFShardWriter", "copy_hf_assets", "export_hf_weights",
    "hf_to_mcore", "load_hf_weights", "load_mcore_checkpoint", "mcore_to_hf", "read_ckpt_shape",
]
