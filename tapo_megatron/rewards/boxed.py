"""Find ``\\boxed{...}`` / ``\\fbox{...}`` answers in model output, with nested braces.

Input: any text (model output, possibly truncated, possibly garbage). Output: the brace-balanced contents of the
boxes. One linear pass matches all braces, so 100 kB of unbalanced ``{`` costs milliseconds, not a quadratic scan.
"""
from __future__ import annotations

import re

# `\boxed{`, `\boxed {`, `\fbox{`: the position of the `{` is what we match braces from.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _closing_braces(text: str) -> dict[int, int]:
    """Map the index of every balanced ``{`` in ``text`` to the index of its ``}``.

    A backslash escapes the next character, so ``\\{`` and ``\\}`` (literal braces, as in ``\\{1, 2\\}``) are
    not grouping braces, while ``\\\\{`` (a line break, then a group) is.
    """
    closing: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i
        i += 1
    return closing


def boxed_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the contents of every complete outermost box in ``text``, in order.

    ``text[start:end]`` is the content without the outer braces. Boxes whose braces never close (a truncated
    response) are skipped. A box inside another box is part of the outer box's content, not a span of its own.
    """
    if "\\boxed" not in text and "\\fbox" not in text:
        return []  # fast path: most responses have one box or none
    closing = _closing_braces(text)
    spans: list[tuple[int, int]] = []
    for match in _BOX_OPEN.finditer(text):
        open_brace = match.end() - 1
        close_brace = closing.get(open_brace)
        if close_brace is None:
            continue
        if spans and open_brace < spans[-1][1]:
            continue  # nested in the previous outermost box
        spans.append((open_brace + 1, close_brace))
    return spans


def _unwrap(content: str, max_depth: int = 8) -> str:
    """``\\boxed{\\boxed{5}}`` -> ``5``: strip boxes that wrap the whole content (at most ``max_depth``)."""
    for _ in range(max_depth):
        stripped = content.strip()
        inner = boxed_spans(stripped)
        if len(inner) != 1:
            break
        start, end = inner[0]
        if end != len(stripped) - 1 or not _BOX_OPEN.fullmatch(stripped[:start]):
            break
        content = stripped[start:end]
    return content


def find_boxed(text: str) -> list[str]:
    """Contents of every complete outermost ``\\boxed{}`` / ``\\fbox{}`` in ``text``, in order of appearance."""
    return [_unwrap(text[start:end]) for start, end in boxed_spans(text)]


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None if there is none.

    Nested braces are kept: ``"so \\boxed{\\frac{\\sqrt{2}}{2}}."`` gives ``"\\frac{\\sqrt{2}}{2}"``; a box
    that wraps a whole box is unwrapped (``\\boxed{\\boxed{5}}`` gives ``"5"``). A box whose braces never close
    is skipped, so a response cut off inside its last box falls back to its previous box.
    Never raises; non-``str`` input gives None.
    """
    if not isinstance(text, str):
        return None
    spans = boxed_spans(text)
    if not spans:
        return None
    start, end = spans[-1]
    return _unwrap(text[start:end])
