"""An explicit, configurable detector of self-reflection in a model's solution text (used for DSR / ERR).

A response "contains a reflection" when any pattern or marker occurs in it. Patterns are regular expressions compiled
case-insensitively (re.IGNORECASE | re.MULTILINE); markers are literal strings matched case-sensitively (the embedded
demo task uses a one-character marker). ``DEFAULT_REFLECTION_PATTERNS`` lists what counts by default, one phrase
family per entry, each anchored on word boundaries so that "await", "the waiting time" or "factually," do not match.

    detector = ReflectionDetector()                       # defaults
    detector = ReflectionDetector(patterns=[r"\\bwait\\b"], markers=["\u21ba"])   # replace the defaults
    detector.is_reflective(text) -> bool; detector.find(text) -> list[ReflectionMatch] (sorted by position)
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_REFLECTION_PATTERNS", "ReflectionMatch", "ReflectionDetector"]

_APOS = "['\u2019]"  # ASCII and typographic apostrophe

DEFAULT_REFLECTION_PATTERNS: tuple[str, ...] = (
    # "wait" as an interjection: followed by punctuation ("Wait, ..." "wait." "Wait—" "wait - ") or opening a
    # sentence/line ("Wait I think"), or after "but"/"oh"/"hmm". Plain verb and noun uses ("they wait 5 minutes",
    # "await", "waiting", "wait-time") and "to wait." do not count.
    r"(?<!\bto )\bwait\b(?=\s*[,.!?:;\u2026\u2013\u2014]|\s+-\s)",
    r"(?:^|(?<=[.!?]\s)|(?<=[.!?]\s\s))wait\b",
    r"\b(?:but|oh|ah|hmm+),?\s+wait\b",
    # explicit re-checking
    r"\blet(?: me|" + _APOS + r"s| us) re-?check\b",
    r"\blet(?: me|" + _APOS + r"s| us) double[- ]check\b",
    r"\blet(?: me|" + _APOS + r"s| us) check (?:that |this |it |my work )?again\b",
    # admitting a mistake: "I made an error", "I've made a small mistake", "I have made an arithmetic error"
    r"\bI(?:" + _APOS + r"ve| have)?\s+made\s+(?:an?\s+|some\s+)?(?:\w+\s+)?(?:error|mistake)s?\b",
    r"\bthat(?:" + _APOS + r"s| is) (?:not right|not correct|incorrect|wrong)\b",
    r"\bthat can(?:" + _APOS + r"t|not) be right\b",
    r"\bon second thought\b",
    r"\bactually,",
    r"\bhmm+\b",
    r"\blet(?: me|" + _APOS + r"s| us) reconsider\b",
    r"\bre-?evaluat(?:e|ing)\b",
)


@dataclass(frozen=True)
class ReflectionMatch:
    start: int  # character offset of the match in the text
    end: int  # exclusive end offset
    text: str  # the matched text
    source: str  # the pattern (regex) or marker (literal) that matched


class ReflectionDetector:
    """Decides whether a response contains a reflection.

    Args:
        patterns: regexes (case-insensitive, multi-line); None uses ``DEFAULT_REFLECTION_PATTERNS``, a list replaces
            them (pass ``[]`` to rely on markers only).
        markers: literal strings, matched case-sensitively anywhere in the text.
    """

    def __init__(self, patterns: Sequence[str] | None = None, markers: Sequence[str] = ()) -> None:
        if isinstance(patterns, str) or isinstance(markers, str):
            raise ValueError("ReflectionDetector: patterns and markers must be lists of strings, not a single string")
        self.patterns: tuple[str, ...] = tuple(DEFAULT_REFLECTION_PATTERNS if patterns is None else patterns)
        self.markers: tuple[str, ...] = tuple(markers)
        self._compiled: list[re.Pattern[str]] = []
        for i, p in enumerate(self.patterns):
            try:
                self._compiled.append(re.compile(p, re.IGNORECASE | re.MULTILINE))
            except re.error as e:
                raise ValueError(f"ReflectionDetector: patterns[{i}] = {p!r} is not a valid regex: {e}") from None
        for i, m in enumerate(self.markers):
            if not m:
                raise ValueError(f"ReflectionDetector: markers[{i}] is empty")
        if not self._compiled and not self.markers:
            raise ValueError("ReflectionDetector: no patterns and no markers; nothing could ever be detected")

    def find(self, text: str) -> list[ReflectionMatch]:
        """Pattern and marker occurrences in ``text``, one per distinct span, sorted by (start, end)."""
        found: list[ReflectionMatch] = []
        for pattern in self._compiled:
            for m in pattern.finditer(text):
                found.append(ReflectionMatch(m.start(), m.end(), m.group(0), pattern.pattern))
        for marker in self.markers:
            pos = text.find(marker)
            while pos != -1:
                found.append(ReflectionMatch(pos, pos + len(marker), marker, marker))
                pos = text.find(marker, pos + len(marker))
        found.sort(key=lambda m: (m.start, m.end))
        # two patterns can match the same span ("Wait," is both an interjection and a sentence opener): keep one
        unique: list[ReflectionMatch] = []
        for m in found:
            if not unique or (unique[-1].start, unique[-1].end) != (m.start, m.end):
                unique.append(m)
        return unique

    def is_reflective(self, text: str) -> bool:
        """True when any pattern or marker occurs in ``text`` (stops at the first hit)."""
        if any(marker in text for marker in self.markers):
            return True
        return any(pattern.search(text) is not None for pattern in self._compiled)

    def __repr__(self) -> str:
        return f"ReflectionDetector({len(self.patterns)} patterns, markers={list(self.markers)!r})"
