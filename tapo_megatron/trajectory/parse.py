"""Tolerant parser of a constructor's answer: ``<analysis>...</analysis> <reconstruction>...</reconstruction>``.

    parse_construction(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> Construction

Input: the decoded text the constructor produced (special tokens already stripped). Output: a ``Construction`` with
``text`` = the reconstruction (leading/trailing whitespace stripped, since it must start exactly where the wrong
response starts and ends right before EOS), ``analysis`` (stripped; may be empty), ``failure`` = None on success or
one of the reasons below, ``raw`` = the input, ``closed`` = whether ``</reconstruction>`` was present.

Tolerated: tag names in any case (``<Analysis>``), whitespace inside the angle brackets (``< /reconstruction >``),
text before, between and after the sections, a missing ``</analysis>`` (the analysis then runs up to
``<reconstruction>``), a missing ``<analysis>`` section (analysis = ""), and a missing ``</reconstruction>`` (the
reconstruction runs to the end of the text: the model stopped at EOS right after it).

Failure reasons (``FailureReason``; later stages add theirs):

    too_long     the text exceeds ``max_chars`` characters (checked first, so a 100 kB answer costs no regex work)
    no_tags      no ``<reconstruction>`` opening tag
    wrong_order  the first ``<reconstruction>`` comes before the first ``<analysis>``
    empty        the reconstruction is empty or whitespace only
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["FailureReason", "Construction", "parse_construction", "DEFAULT_MAX_CHARS"]

DEFAULT_MAX_CHARS = 65_536  # a construction copies one wrong solution plus a correction: far below this


class FailureReason(str, enum.Enum):
    """Why a construction was dropped. ``Construction.failure`` holds the ``.value`` string."""

    NO_TAGS = "no_tags"  # parse: no <reconstruction> tag
    WRONG_ORDER = "wrong_order"  # parse: <reconstruction> before <analysis>
    EMPTY = "empty"  # parse: empty reconstruction
    TOO_LONG = "too_long"  # parse: text over max_chars; policy: generation hit its token limit; splice: over max_tokens
    ABORTED = "aborted"  # policy: the engine aborted the generation before </reconstruction>
    NO_ERROR = "no_error"  # step verifier: the "wrong" response has no faulty step (nothing to correct)
    PREFIX_MISMATCH = "prefix_mismatch"  # splice: the reconstruction does not copy the wrong response's prefix
    NO_CONTINUATION = "no_continuation"  # splice: the reconstruction adds nothing after the copied prefix
    SHORT_PREFIX = "short_prefix"  # builder: the splice reuses fewer than tapo.min_reused_tokens rollout tokens


@dataclass
class Construction:
    """One constructor answer, parsed."""

    text: str | None  # the reconstruction (stripped); None when failure is set
    analysis: str  # the diagnosis ("" when absent or on failure)
    failure: str | None  # a FailureReason value, None on success
    raw: str  # the constructor's full answer, for logging
    closed: bool = False  # True when </reconstruction> was present (False: ran to the end of the text)


def _tag(name: str, closing: bool) -> re.Pattern[str]:
    slash = r"/\s*" if closing else ""
    return re.compile(rf"<\s*{slash}{name}\s*>", re.IGNORECASE)


_ANALYSIS_OPEN = _tag("analysis", closing=False)
_ANALYSIS_CLOSE = _tag("analysis", closing=True)
_RECON_OPEN = _tag("reconstruction", closing=False)
_RECON_CLOSE = _tag("reconstruction", closing=True)


def _failed(reason: FailureReason, raw: str, analysis: str = "") -> Construction:
    return Construction(text=None, analysis=analysis, failure=reason.value, raw=raw)


def parse_construction(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> Construction:
    """Parse one constructor answer (see the module docstring for what is tolerated and the failure reasons)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    if len(text) > max_chars:
        return _failed(FailureReason.TOO_LONG, text)
    recon_open = _RECON_OPEN.search(text)
    if recon_open is None:
        return _failed(FailureReason.NO_TAGS, text)
    analysis_open = _ANALYSIS_OPEN.search(text)
    if analysis_open is not None and analysis_open.start() > recon_open.start():
        return _failed(FailureReason.WRONG_ORDER, text)

    analysis = ""
    if analysis_open is not None:
        # The analysis ends at </analysis> when it closes before the reconstruction, else at <reconstruction>.
        close = _ANALYSIS_CLOSE.search(text, analysis_open.end(), recon_open.start())
        analysis = text[analysis_open.end():close.start() if close else recon_open.start()].strip()

    recon_close = _RECON_CLOSE.search(text, recon_open.end())
    body = text[recon_open.end():recon_close.start() if recon_close else len(text)].strip()
    if not body:
        return _failed(FailureReason.EMPTY, text, analysis)
    return Construction(text=body, analysis=analysis, failure=None, raw=text, closed=recon_close is not None)
