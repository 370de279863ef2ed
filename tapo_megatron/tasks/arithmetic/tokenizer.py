"""The arithmetic task's character-level tokenizer (20 tokens) and its prompt format.

    prompt    <pad><pad>...<pad>7+5*3-4>          left-padded with <pad> to a fixed ``prompt_len``
    response  5*3=15;7+15=22;22-4=18;A18<eos>
"""
from __future__ import annotations

from typing import Sequence

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
PROMPT_END = ">"  # closes the problem; the response starts right after it
STEP_END = ";"
ANSWER_MARK = "A"
CORRECTION_MARKER = "W"  # "wait": the self-correction marker of a reflective response

# Ids are part of checkpoints: only ever append to these lists, never reorder.
_SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN)
_CHAR_TOKENS: tuple[str, ...] = tuple("0123456789") + ("+", "-", "*", "=", STEP_END, ANSWER_MARK, PROMPT_END,
                                                        CORRECTION_MARKER)


class ArithmeticTokenizer:
    """Character-level tokenizer of the demo task (20 tokens).

    Ids: ``<pad>``=0, ``<eos>``=1, then ``0``–``9`` = 2–11, ``+``=12, ``-``=13, ``*``=14, ``=``=15, ``;``=16,
    ``A``=17, ``>``=18, ``W``=19. Same duck-typed interface as ``tapo_megatron.data.tokenizer.HFTokenizer``.
    """

    def __init__(self) -> None:
        self._id_to_token: tuple[str, ...] = _SPECIAL_TOKENS + _CHAR_TOKENS
        self._token_to_id: dict[str, int] = {tok: i for i, tok in enumerate(self._id_to_token)}
        self._special_ids = frozenset(self._token_to_id[t] for t in _SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def pad_id(self) -> int:
        return self._token_to_id[PAD_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._token_to_id[EOS_TOKEN]

    def token_to_id(self, token: str) -> int:
        """Id of one token (a single character or ``<pad>``/``<eos>``)."""
        if token not in self._token_to_id:
            raise ValueError(f"unknown token {token!r}; the vocabulary is {list(self._id_to_token)}")
        return self._token_to_id[token]

    def encode(self, text: str) -> list[int]:
        """Text -> ids, one per character; the literal strings ``<pad>``/``<eos>`` encode to their special ids.

        Raises ValueError naming the first character outside the vocabulary and its position.
        """
        ids: list[int] = []
        pos = 0
        while pos < len(text):
            if text[pos] == "<":  # '<' is not a vocabulary character, so it can only start a special token
                for special in _SPECIAL_TOKENS:
                    if text.startswith(special, pos):
                        ids.append(self._token_to_id[special])
                        pos += len(special)
                        break
                else:
                    raise ValueError(f"cannot encode {text!r}: unknown special token at position {pos}")
                continue
            tok_id = self._token_to_id.get(text[pos])
            if tok_id is None:
                raise ValueError(
                    f"cannot encode {text!r}: character {text[pos]!r} at position {pos} is not in the vocabulary "
                    f"{''.join(_CHAR_TOKENS)!r}"
                )
            ids.append(tok_id)
            pos += 1
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Ids -> text; ``skip_special`` drops ``<pad>`` and ``<eos>``. Raises ValueError on an id out of range."""
        parts: list[str] = []
        for i in ids:
            i = int(i)  # accepts numpy / torch integer scalars
            if not 0 <= i < len(self._id_to_token):
                raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self._id_to_token)})")
            if skip_special and i in self._special_ids:
                continue
            parts.append(self._id_to_token[i])
        return "".join(parts)

    def chat_prompt_ids(self, problem: str, system: str | None = None, enable_thinking: bool = False) -> list[int]:
        """The task's "chat format": ``problem>``, unpadded (``encode_prompt`` pads). No system turn, no thinking."""
        if system is not None or enable_thinking:
            raise ValueError("the arithmetic task has no system prompt and no thinking mode")
        return self.encode(format_prompt(problem))


def format_prompt(problem: str) -> str:
    """The prompt text of a problem: the expression followed by ``>``, e.g. ``"7+5*3-4>"``."""
    return problem + PROMPT_END


def encode_prompt(problem: str, prompt_len: int, tokenizer: ArithmeticTokenizer | None = None) -> list[int]:
    """Prompt ids left-padded with ``<pad>`` to exactly ``prompt_len`` tokens.

    The pads are ordinary tokens the model sees (no attention mask needed), which keeps every prompt the same length
    so the response always starts at position ``prompt_len``. Raises ValueError if the prompt is longer.
    """
    tok = tokenizer or TOKENIZER
    ids = tok.encode(format_prompt(problem))
    if len(ids) > prompt_len:
        raise ValueError(f"prompt {format_prompt(problem)!r} has {len(ids)} tokens, more than prompt_len={prompt_len}")
    return [tok.pad_id] * (prompt_len - len(ids)) + ids


TOKENIZER = ArithmeticTokenizer()
