"""Tokenizers behind one duck-typed interface (``Tokenizer``), so every stage works with the demo task and Qwen3.

    load_tokenizer("qwen3")                  -> HFTokenizer of the shipped Qwen3 tokenizer (data/files/qwen3_tokenizer)
    load_tokenizer("/path/to/hf_dir")        -> HFTokenizer (transformers AutoTokenizer, local files only)

The arithmetic task's char tokenizer lives with its task (``tasks.arithmetic.tokenizer``). All provide ``encode(text) -> list[int]`` (no special tokens added), ``decode(ids, skip_special=True) -> str``,
``eos_id``, ``pad_id``, ``vocab_size`` and ``chat_prompt_ids(problem, system=None, enable_thinking=False)``.
Nothing is downloaded: a name that is not "qwen3" must be an existing local folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from tapo_megatron.errors import ConfigError


@runtime_checkable
class Tokenizer(Protocol):
    """What the stages need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    def chat_prompt_ids(self, problem: str, system: str | None = None, enable_thinking: bool = False) -> list[int]: ...


class HFTokenizer:
    """Wraps a ``transformers`` tokenizer (e.g. Qwen3's) in the project's interface.

    ``eos_id`` is the tokenizer's eos token (Qwen3: ``<|im_end|>`` = 151645, which ends an assistant turn) and
    ``pad_id`` its pad token (Qwen3: ``<|endoftext|>`` = 151643). ``vocab_size`` counts the tokenizer's tokens,
    added tokens included (Qwen3: 151,669); the model's embedding may be padded beyond it (Qwen3: 151,936).
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self._tok = hf_tokenizer
        if hf_tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {hf_tokenizer.name_or_path!r} defines no eos token")
        if hf_tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {hf_tokenizer.name_or_path!r} defines no pad token")

    @property
    def hf(self) -> Any:
        """The wrapped transformers tokenizer (for the rare caller that needs more than this interface)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def pad_id(self) -> int:
        return int(self._tok.pad_token_id)

    def encode(self, text: str) -> list[int]:
        """Text -> ids without BOS/EOS; special-token strings in the text (``<|im_start|>``) map to their ids."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def chat_prompt_ids(self, problem: str, system: str | None = None, enable_thinking: bool = False) -> list[int]:
        """Prompt ids of one user turn plus the assistant header, via the tokenizer's chat template.

        With Qwen3 and ``enable_thinking=False`` (non-thinking mode, TAPO's setting) the text is
        ``<|im_start|>user\\n{problem}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``.
        """
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": problem}
        ]
        # Render to text, then encode: the same ids as tokenize=True, without depending on its return type.
        text = self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        return self.encode(text)


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> HFTokenizer:
    """``"qwen3"`` -> the shipped Qwen3 tokenizer; a local folder -> ``HFTokenizer`` (never downloads)."""
    if str(name_or_path) == "qwen3":
        from tapo_megatron.data.assets import qwen3_tokenizer_dir

        name_or_path = qwen3_tokenizer_dir()
    path = Path(name_or_path)
    if not path.is_dir():
        raise ConfigError(
            f"tokenizer {str(name_or_path)!r}: not 'qwen3' (the shipped Qwen3 tokenizer) and not a local folder "
            "(hub names are not supported: nothing is downloaded)")
    from transformers import AutoTokenizer  # imported here: transformers takes seconds to import

    return HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
