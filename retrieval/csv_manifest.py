"""Reading a CSV manifest: its header, then each row's values or the reason it is broken; and which columns hold
numbers. A stray quote that would swallow the rows after it is reported, and those rows are read again."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from retrieval.errors import RetrievalError

INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")  # numbers as people write them: no 007, 1_000, ' 12 ' or nan
DECIMAL = re.compile(r"-?((0|[1-9][0-9]*)(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str] | str]]:
    """The header (unique, named columns) and, for each row after it, its values or why it is broken."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        lines = list(f)
    try:
        header = next(csv.reader(lines[:1]))
    except (StopIteration, csv.Error):
        header = []
    if not header or not all(name.strip() for name in header):
        raise RetrievalError(f"corpus {path} has no header row, or a column without a name in it (line 1)")
    if len(set(header)) != len(header):
        twice = next(name for name in header if header.count(name) > 1)
        raise RetrievalError(f"corpus {path} names column {twice!r} twice in its header")
    return header, _csv_rows(lines, len(header))


def _csv_rows(lines: list[str], width: int) -> list[list[str] | str]:
    """The rows after the header: each its values, or the reason it is broken.

    A broken row (a wrong field count, a field over csv's size limit, an unterminated quote that runs on into
    the lines after it) is reported, and reading starts again on the line after its first, so the rows that a
    stray quote swallowed are still read."""
    rows: list[list[str] | str] = []
    at = 1  # index in `lines` of the next record; lines[i] is line i + 1 of the file
    while at < len(lines):
        base, restart = at, None
        reader = csv.reader((lines[i] for i in range(base, len(lines))), strict=True)
        try:
            for values in reader:
                first, at = at, base + reader.line_num  # this record spans lines[first:at]
                if not values:
                    continue
                spans = at - first
                runs_on = spans > 1 and (len(values) != width or _looks_like_rows(lines[first + 1:at], width))
                if runs_on:
                    rows.append(f"broken manifest row (line {first + 1}): a quote left open runs on into "
                                f"{spans - 1} more line{'s' if spans > 2 else ''}")
                    restart = first + 1
                    break
                if len(values) != width:
                    rows.append(f"broken manifest row (line {first + 1}): {len(values)} fields, "
                                f"the header has {width}")
                    continue
                rows.append(values)
        except csv.Error as e:
            reason = "a quote left open runs on to the end of the file" if "end of data" in str(e) else str(e)
            rows.append(f"broken manifest row (line {at + 1}): {reason}")
            restart = at + 1
        if restart is None:
            break
        at = restart
    return rows


def _looks_like_rows(lines: list[str], width: int) -> bool:
    """Whether most of these lines (inside one quoted field) would each be a row of `width` fields on their own."""
    if width < 2 or not lines:
        return False
    rows = 0
    for line in lines:
        try:
            rows += len(next(csv.reader([line]), [])) == width
        except csv.Error:
            pass
    return rows > 0 and 2 * rows >= len(lines)


def as_numbers(values: list[str]) -> list[int] | list[float] | None:
    """The values as ints, else floats, when every one is written as such a number; else None. An integer past
    int64 is a code to keep whole, not a number to round."""
    for kind, pattern in ((int, INTEGER), (float, DECIMAL)):
        if all(pattern.fullmatch(v) and not (INTEGER.fullmatch(v) and abs(int(v)) >= 2**63) for v in values):
            return [kind(v) for v in values]
    return None
