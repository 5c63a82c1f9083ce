"""The engine's exception type, which reaches users as a single clear line, and the indexers' turned into it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from indexers.errors import IndexerError


class RetrievalError(Exception):
    """A problem with the user's input or files: the CLI prints it as one line, without a traceback."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def indexer_errors() -> Iterator[None]:
    """The indexers package's refusals as RetrievalError, for callers of the engine (a decorator, or `with`)."""
    try:
        yield
    except IndexerError as e:
        raise RetrievalError(str(e)) from None
