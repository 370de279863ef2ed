"""The project's error family: bad input a user can fix, reported by ``tapo`` as one line (no traceback).

    TapoError
      ConfigError       a missing, unknown or contradictory config field (names it)
        UnknownNameError  a plug-in name no registry knows (also a KeyError)
      DataError         a bad data file or row (names the path, and the line where there is one)
      CheckpointError   a missing, wrong or corrupted checkpoint (names the path)
      OutputExistsError an output directory that exists (also a FileExistsError); pass --overwrite

Anything else is a bug (ours or a dependency's) and keeps its traceback. Each class also derives from the built-in
exception that callers caught before this family existed (ValueError / FileNotFoundError), so ``except ValueError``
still works.
"""
from __future__ import annotations


class TapoError(Exception):
    """Base class of every error the ``tapo`` command reports as one line."""


class ConfigError(TapoError, ValueError):
    """A missing, unknown or contradictory config field; the message names it."""


class UnknownNameError(ConfigError, KeyError):
    """A name that no registry holds; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OutputExistsError(TapoError, FileExistsError):
    """The output directory exists and ``overwrite`` (``--overwrite``) was not given."""


class DataError(TapoError, ValueError):
    """A bad data file or row; the message names the path (``path:line: reason`` for a row).

    ``DataError(bad_row)`` with a ``data.queries.BadRow`` keeps it as ``.bad_row``; ``DataError("text")`` has none.
    """

    def __init__(self, what: object) -> None:
        super().__init__(str(what))
        self.bad_row = what if hasattr(what, "line") else None


class CheckpointError(TapoError, ValueError):
    """A missing, wrong-shaped or corrupted checkpoint or model directory; the message names the path."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (or model directory) where one was named."""
