"""Load problem sets from JSONL into ``Query`` records, reporting every bad row with file and line.

Input: one JSON object per line with ``problem`` and ``answer`` (required, non-empty), ``id`` and ``source``
(optional) and ``solution`` (optional), like the shipped files (``data.assets``)::

    {"id": "aime2024-I-01", "problem": "Every morning Aya ...", "answer": "204", "source": "AIME 2024 I ..."}

Output: a ``QueryFile`` with the queries in file order, the bad rows, and the gold solutions by id.

A bad row is a line that is not UTF-8, not JSON, not a JSON object, lacks a non-empty ``problem``/``answer``, has a
field of the wrong type, or repeats an earlier id. With ``on_error="skip"`` each becomes a ``BadRow`` in
``QueryFile.bad_rows`` and one warning gives the count; with ``on_error="raise"`` the first raises ``DataError``
("path:line: reason"). Blank lines hold no row and are passed over.

    qf = load_queries(data_file("aime2024.jsonl"), tokenizer=load_tokenizer("qwen3"))
    qf = qf.shuffle(seed=0)
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from tqdm import tqdm

from tapo_megatron.data.tokenizer import Tokenizer
from tapo_megatron.errors import DataError
from tapo_megatron.records import Query

logger = logging.getLogger(__name__)

OnError = Literal["skip", "raise"]
PromptBuilder = Callable[[str], list[int]]  # problem text -> prompt token ids


@dataclass(frozen=True)
class BadRow:
    """One rejected line of a data file."""

    path: Path
    line: int  # 1-based line number
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class QueryFile:
    """The usable rows of a data file, plus what was rejected."""

    path: Path
    queries: list[Query]  # file order unless shuffled
    bad_rows: list[BadRow] = field(default_factory=list)
    solutions: dict[str, str] = field(default_factory=dict)  # query id -> gold solution text, where the file has one

    def __len__(self) -> int:
        return len(self.queries)

    def __iter__(self) -> Iterator[Query]:
        return iter(self.queries)

    def __getitem__(self, index: int) -> Query:
        return self.queries[index]

    @property
    def ids(self) -> list[str]:
        return [q.id for q in self.queries]

    def shuffle(self, seed: int) -> "QueryFile":
        """A new QueryFile with the queries in a random order that depends only on ``seed`` and the file order."""
        order = list(self.queries)
        random.Random(seed).shuffle(order)
        return QueryFile(self.path, order, list(self.bad_rows), dict(self.solutions))


def _text_field(obj: dict[str, Any], name: str, *, required: bool, numbers_ok: bool = False) -> str | None:
    """The field as a stripped string; None if absent and optional. Raises ValueError with the reason."""
    value = obj.get(name)
    if value is None:
        if required:
            raise ValueError(f"missing field {name!r}")
        return None
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # e.g. "answer": 204 in hand-written files
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"empty field {name!r}")
    return value.strip()


def load_queries(
    path: str | os.PathLike[str],
    *,
    on_error: OnError = "skip",
    tokenizer: Tokenizer | None = None,
    prompt_builder: PromptBuilder | None = None,
    limit: int | None = None,
    answer_check: Callable[[str], str | None] | None = None,
) -> QueryFile:
    """Read a JSONL problem file into Queries.

    Args:
        path: the JSONL file.
        on_error: "skip" collects bad rows in ``QueryFile.bad_rows`` and logs one warning; "raise" raises
            ``DataError`` at the first bad row.
        tokenizer: if given (and no prompt_builder), ``prompt_ids = tokenizer.chat_prompt_ids(problem)``.
        prompt_builder: problem -> prompt ids, for any other prompt format. Give at most one of the two; with
            neither, ``prompt_ids`` stays empty.
        limit: keep only the first ``limit`` good rows. The whole file is still validated, so bad rows and
            duplicate ids anywhere in it are reported.
        answer_check: gold answer -> None if usable, else the reason it is not (e.g. the math verifier cannot
            parse it); a row whose answer fails is a bad row like any other.

    Row fields: ``id`` (string or integer; absent -> ``"<file stem>-<line>"``), ``source`` (absent -> file stem),
    ``solution`` (kept in ``QueryFile.solutions``); numeric answers become strings; other fields are ignored.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if tokenizer is not None and prompt_builder is not None:
        raise ValueError("give either tokenizer or prompt_builder, not both")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    build = prompt_builder if prompt_builder is not None else (tokenizer.chat_prompt_ids if tokenizer else None)
    path = Path(path)

    queries: list[Query] = []
    solutions: dict[str, str] = {}
    bad_rows: list[BadRow] = []
    first_line_of_id: dict[str, int] = {}

    def reject(line_no: int, reason: str) -> None:
        bad = BadRow(path, line_no, reason)
        if on_error == "raise":
            raise DataError(bad)
        bad_rows.append(bad)

    # Read bytes and decode per line, so one bad byte costs one row rather than the file.
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, desc=f"load {path.name}", unit="B", unit_scale=True,
                                     disable=None, leave=False) as bar:  # shown on a terminal only
        for line_no, raw in enumerate(f, start=1):
            bar.update(len(raw))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                reject(line_no, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                reject(line_no, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                reject(line_no, f"expected a JSON object, got {type(obj).__name__}")
                continue
            try:
                problem = _text_field(obj, "problem", required=True)
                answer = _text_field(obj, "answer", required=True, numbers_ok=True)
                raw_id = obj.get("id")
                if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
                    raise ValueError(f"field 'id' must be a string or integer, got {type(raw_id).__name__}")
                query_id = str(raw_id).strip() if raw_id is not None else f"{path.stem}-{line_no}"
                if not query_id:
                    raise ValueError("empty field 'id'")
                source = _text_field(obj, "source", required=False) or path.stem
                solution = _text_field(obj, "solution", required=False)
                problem_with_answer = answer_check(answer) if answer_check is not None and answer else None
                if problem_with_answer:
                    raise ValueError(f"gold answer {answer!r}: {problem_with_answer}")
            except ValueError as e:
                reject(line_no, str(e))
                continue
            if query_id in first_line_of_id:
                reject(line_no, f"duplicate id {query_id!r} (first seen at line {first_line_of_id[query_id]})")
                continue
            first_line_of_id[query_id] = line_no
            assert problem is not None and answer is not None  # required fields
            if limit is not None and len(queries) >= limit:
                continue  # keep validating the rest of the file
            prompt_ids = build(problem) if build is not None else []
            queries.append(Query(id=query_id, problem=problem, answer=answer, prompt_ids=prompt_ids, source=source))
            if solution:
                solutions[query_id] = solution

    if bad_rows:
        logger.warning(
            "%s: skipped %d bad row(s) of %d; first: %s", path, len(bad_rows), len(bad_rows) + len(first_line_of_id),
            bad_rows[0],
        )
    return QueryFile(path, queries, bad_rows, solutions)
