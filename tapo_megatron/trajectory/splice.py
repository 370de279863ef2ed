"""Splicing (TAPO spec step 5): a wrong rollout + a reconstruction text -> a constructed ``Trajectory``.

    splice(query, wrong, reconstruction_text, tokenizer, min_prefix_match=0.9, max_tokens=None) -> SpliceResult

The trained trajectory is conditioned on the ORIGINAL prompt (``wrong.prompt_ids``), never on the construction
prompt. Its response is

    wrong.response_ids[:k]  (SAMPLED: the policy's own tokens, bit-identical)  +  encode(R[p:]) + [eos]  (INJECTED)

where R is the reconstruction and p = len(decode(wrong.response_ids[:k])).

Definitions (W = the wrong response's text = ``decode(wrong.response_ids)`` up to its first eos/pad token):

- **Copied prefix** c: the longest common character prefix of W and R (the verbatim copy).
- **Divergence point** D (``copy_extent``): how far R's copy of W reaches when whitespace is ignored and copying
  slips are skipped (a substitution or deletion of <= 8 characters after which both agree again for >= 8
  characters); D is the index in W just after the last character matched this way. A perfect copy that diverges
  at the faulty step has D = c (or D a few characters past c when the divergence sits next to whitespace): the
  correction that follows is an insertion, which ends the copy even when the corrected continuation repeats W's
  later steps.
- **prefix_fraction** = c / max(c, D) (0 when both are 0): the share of W's characters before the divergence that
  R copied verbatim. A policy that re-flowed a line break, or mistyped a digit, early in its copy has a small c and
  a large D.
- Rejected as ``prefix_mismatch`` when prefix_fraction < ``min_prefix_match`` or c = 0 (a reconstruction that
  drops the prefix, or starts anywhere but at W's first character, copies nothing).
- Rejected as ``no_continuation`` when R is a prefix of W (nothing to inject), ``too_long`` when the spliced
  response exceeds ``max_tokens``.
- **Token boundary.** k is the largest token count with ``decode(ids[:k])`` a prefix of ``R[:c]``. When the
  divergence falls inside a token, that token is not reused: the characters it shares with R are re-tokenised as
  part of the injected text, so ``decode(response_ids) == R`` holds exactly (for tokenizers whose decoding is
  concatenative: byte-level BPE such as Qwen3's, and the demo's char tokenizer).

Log-probs: ``Trajectory.engine_logprobs`` is None for constructed trajectories (the records' convention: only fully
sampled responses carry engine log-probs); the actor recomputes old log-probs over the whole sequence anyway.
The spliced trajectory's reward is left at 0.0: the builder scores it with the verifier.
"""
from __future__ import annotations

from dataclasses import dataclass

from tapo_megatron.data.tokenizer import Tokenizer
from tapo_megatron.records import Provenance, Query, Rollout, Trajectory, TrajectoryKind
from tapo_megatron.trajectory.parse import FailureReason

__all__ = ["SpliceResult", "splice", "response_body_ids", "common_prefix_len", "copy_extent"]

_REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes an incomplete UTF-8 character to


@dataclass
class SpliceResult:
    """Outcome of one splice. ``trajectory`` is set iff ``failure`` is None."""

    trajectory: Trajectory | None
    failure: str | None  # a FailureReason value
    prefix_fraction: float  # c / max(c, D), see the module docstring; 0.0 when nothing was copied
    prefix_chars: int = 0  # p: characters of R covered by reused rollout tokens
    prefix_tokens: int = 0  # k: rollout tokens reused (SAMPLED)
    injected_tokens: int = 0  # INJECTED tokens, eos included


def response_body_ids(response_ids: list[int], tokenizer: Tokenizer) -> list[int]:
    """The response up to (not including) its first eos or pad token: the part that has text."""
    stops = {tokenizer.eos_id, tokenizer.pad_id}
    for i, tok in enumerate(response_ids):
        if tok in stops:
            return list(response_ids[:i])
    return list(response_ids)


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on slices: C-speed comparisons instead of a Python loop over characters
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _content(text: str) -> tuple[str, list[int]]:
    """The non-whitespace characters of ``text`` and, for each, its index in ``text``."""
    index = [i for i, ch in enumerate(text) if not ch.isspace()]
    return "".join(text[i] for i in index), index


def copy_extent(
    wrong_text: str, reconstruction: str, max_gap: int = 8, min_resync: int = 8, max_insert: int = 0
) -> int:
    """D: how far into ``wrong_text`` the reconstruction's copy of it reaches (an index into ``wrong_text``).

    Both texts are compared on their non-whitespace characters. Walk them from the start while they agree; at a
    mismatch, look for the nearest copying slip after which they agree again for ``min_resync`` characters, and keep
    walking; when there is none, the copy ends. A slip skips dw <= ``max_gap`` characters of the wrong text and
    dr <= ``max_gap`` of the reconstruction with dr <= dw + ``max_insert``: by default a substitution or a deletion.
    Text the reconstruction adds (beyond whitespace) is read as the start of the correction (``W7+15=22;``,
    "Wait, ..."), never as a slip, even when the corrected continuation then repeats the wrong text's next steps.
    Returns the index just after the last character of ``wrong_text`` matched this way (0 when none).
    """
    w, w_index = _content(wrong_text)
    r, _ = _content(reconstruction)
    i = j = matched = 0
    while True:
        n = common_prefix_len(w[i:], r[j:])
        i, j = i + n, j + n
        if n:
            matched = i
        if i >= len(w) or j >= len(r):
            break
        skip = None
        for total in range(1, 2 * max_gap + 1):  # nearest resynchronisation first
            for dw in range(max(0, total - max_gap), min(total, max_gap) + 1):
                dr = total - dw
                if dr > dw + max_insert:
                    continue
                run = w[i + dw:i + dw + min_resync]
                if len(run) == min_resync and run == r[j + dr:j + dr + min_resync]:
                    skip = (dw, dr)
                    break
            if skip:
                break
        if skip is None:
            break
        i, j = i + skip[0], j + skip[1]
    return w_index[matched - 1] + 1 if matched else 0


def _reusable_prefix(ids: list[int], text: str, tokenizer: Tokenizer) -> tuple[int, int]:
    """Largest k with ``text.startswith(decode(ids[:k]))``, and len(decode(ids[:k])).

    Binary search on the monotone relaxation "decode(ids[:k]) without trailing U+FFFD is a prefix of text" (decoded
    prefixes of a concatenative tokenizer only grow; an incomplete multi-byte character shows as trailing U+FFFD),
    then step down past any k that ends inside a character. O(log n) decodes instead of n.
    """
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(tokenizer.decode(ids[:mid]).rstrip(_REPLACEMENT)):
            lo = mid
        else:
            hi = mid - 1
    for k in range(lo, 0, -1):
        decoded = tokenizer.decode(ids[:k])
        if text.startswith(decoded):
            return k, len(decoded)
    return 0, 0


def splice(
    query: Query,
    wrong: Rollout,
    reconstruction_text: str,
    tokenizer: Tokenizer,
    min_prefix_match: float = 0.9,
    max_tokens: int | None = None,
    advantage_group: int | None = None,
) -> SpliceResult:
    """Build the constructed trajectory for one (wrong rollout, reconstruction) pair; see the module docstring.

    Args:
        query: the original query (its id must match ``wrong.query_id``).
        wrong: the wrong rollout whose prefix is reused.
        reconstruction_text: R, the constructor's reconstruction (wrong prefix + correction + continuation).
        tokenizer: the policy's tokenizer (``encode``, ``decode``, ``eos_id``, ``pad_id``).
        min_prefix_match: minimum prefix_fraction, in [0, 1].
        max_tokens: cap on the spliced response's tokens (eos included); None: no cap.
        advantage_group: the trajectory's ``advantage_group``; default ``wrong.group_index``.

    Returns:
        SpliceResult; ``trajectory.response_ids`` = reused prefix + injected tokens + eos, ``provenance`` SAMPLED on
        the prefix and INJECTED after it, ``reward`` 0.0 (unscored), ``response_text`` = R.
    """
    if wrong.query_id != query.id:
        raise ValueError(f"splice: wrong rollout belongs to query {wrong.query_id!r}, not {query.id!r}")
    if query.prompt_ids and list(query.prompt_ids) != list(wrong.prompt_ids):
        raise ValueError(
            f"splice: the rollout of query {query.id!r} was sampled from other prompt ids than the query's"
        )
    if not 0.0 <= min_prefix_match <= 1.0:
        raise ValueError(f"min_prefix_match must be in [0, 1], got {min_prefix_match}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")

    body = response_body_ids(wrong.response_ids, tokenizer)
    wrong_text = tokenizer.decode(body)
    recon = reconstruction_text
    copied = common_prefix_len(wrong_text, recon)
    divergence = max(copied, copy_extent(wrong_text, recon))
    fraction = copied / divergence if divergence else 0.0
    if copied == 0 or fraction < min_prefix_match:
        return SpliceResult(None, FailureReason.PREFIX_MISMATCH.value, fraction)
    if copied == len(recon):
        return SpliceResult(None, FailureReason.NO_CONTINUATION.value, fraction)

    k, p = _reusable_prefix(body, recon[:copied], tokenizer)
    injected = tokenizer.encode(recon[p:]) + [tokenizer.eos_id]
    response_ids = body[:k] + injected
    if max_tokens is not None and len(response_ids) > max_tokens:
        return SpliceResult(None, FailureReason.TOO_LONG.value, fraction, p, k, len(injected))
    trajectory = Trajectory(
        query_id=query.id,
        kind=TrajectoryKind.CONSTRUCTED,
        advantage_group=wrong.group_index if advantage_group is None else advantage_group,
        prompt_ids=list(wrong.prompt_ids),
        response_ids=response_ids,
        provenance=[Provenance.SAMPLED] * k + [Provenance.INJECTED] * len(injected),
        reward=0.0,
        engine_logprobs=None,
        response_text=recon,
    )
    return SpliceResult(trajectory, None, fraction, p, k, len(injected))
