"""Which files a corpus may read, and opening them so that the check cannot be raced.

A corpus has a root: the folder itself, or the folder of its manifest. By default:
- a path under the root is read only if it really is there: a symlink that leads out of the root is
  refused (`follow_symlinks` allows it);
- a manifest may name files outside its folder (an absolute path, `../`), which is the user's own choice on
  their own machine; `root_only` refuses them, for corpora written by someone else.

`open_file` checks the file it has actually opened (its /proc/self/fd link on Linux), so a path swapped for a
symlink between the check and the read is still refused.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import asdict, dataclass
from typing import BinaryIO


class PathRefused(Exception):
    """A file the corpus may not read; the message is the reason."""


def is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class PathPolicy:
    root: str  # absolute and normalised, as given (it may itself be reached through a symlink)
    follow_symlinks: bool = False
    root_only: bool = False

    @classmethod
    def for_root(cls, root: str | os.PathLike, follow_symlinks: bool = False, root_only: bool = False) -> PathPolicy:
        return cls(os.path.normpath(os.path.abspath(root)), follow_symlinks, root_only)

    def to_dict(self) -> dict:
        return asdict(self)

    def problem(self, path: str | os.PathLike, real: str | None = None) -> str | None:
        """Why the file at `path` may not be read, or None; `real` is where it really is, if known."""
        path = os.path.normpath(os.path.abspath(path))
        if not is_within(path, self.root):
            return f"path outside the corpus root {self.root} (--root-only)" if self.root_only else None
        if self.follow_symlinks:
            return None
        real = real or os.path.realpath(path)
        if not is_within(real, os.path.realpath(self.root)):
            return f"symlink leads out of the corpus root: {path} → {real} (--follow-symlinks reads it)"
        return None

    def open_file(self, path: str | os.PathLike) -> BinaryIO:
        """Open a regular file for reading, or raise PathRefused / OSError."""
        path = os.fspath(path)
        if reason := self.problem(path):
            raise PathRefused(reason)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PathRefused(f"not a regular file: {path}")
            proc = f"/proc/self/fd/{fd}"
            if os.path.islink(proc) and (reason := self.problem(path, real=os.readlink(proc))):
                raise PathRefused(reason)
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise


def read_text(file: BinaryIO, max_chars: int) -> tuple[str, bool]:
    """At most `max_chars` characters of UTF-8 text (bad bytes kept as surrogates), and whether there was more."""
    with io.TextIOWrapper(file, encoding="utf-8-sig", errors="surrogateescape") as text:
        value = text.read(max_chars + 1)
    return value[:max_chars], len(value) > max_chars


def excerpt(text: str | None, limit: int = 200) -> str | None:
    """A short start of a text, for error rows: never the whole of a huge one."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + "…"

