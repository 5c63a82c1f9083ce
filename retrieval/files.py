"""Atomic file writes (a temporary name in the same folder, fsync, rename, fsync the folder) and folder locks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError

LOCK_FILE = ".lock"


def temporary_name(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}"


def is_leftover(path: Path) -> bool:
    """A temporary file of an atomic write that never finished (its writer was killed), or a lock file."""
    return path.name == LOCK_FILE or (path.name.startswith(".") and ".tmp-" in path.name)


def remove_leftovers(folder: Path) -> None:
    """Delete the temporary files that killed writers left in `folder` (not the lock: a live job may hold it).
    Call it holding the folder's lock."""
    for path in folder.iterdir():
        if is_leftover(path) and path.name != LOCK_FILE:
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced (if `durable`) and renamed over `path`,
    and the rename itself is made durable by an fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temporary_name(path.name))
    try:
        yield tmp
        durable_rename(tmp, path, durable)
    finally:
        if tmp.exists():
            tmp.unlink()


def durable_rename(tmp: Path, path: Path, durable: bool = True) -> None:
    """fsync `tmp` (if `durable`), rename it over `path`, and fsync the folder so that the rename survives too."""
    if durable:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_out_folder(out: Path, kind: str, is_ours: Callable[[Path], bool]) -> None:
    """Refuse an --out that is a file, or a folder holding anything but `kind` (or a killed run's leftovers)."""
    if out.exists() and not out.is_dir():
        raise RetrievalError(f"--out {out} is a file; give a folder for {kind}")
    if out.is_dir() and not is_ours(out) and any(not is_leftover(p) for p in out.iterdir()):
        raise RetrievalError(f"{out} exists and is not {kind}; use a new or empty --out folder")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if needed) for one writing job; a second job is refused, or
    with `wait` waits for it. The lock is a POSIX record lock: the kernel drops it with its process however that
    process ended, and the process's forked children (data-loader workers) do not hold it; it is not reentrant."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except (BlockingIOError, PermissionError):
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another job"
            raise RetrievalError(f"{folder} is in use by {holder}; wait for it to finish, or use another "
                                 "folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (process {os.getpid()})".encode(), 0)  # so that a refused job can say who holds it
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a folder no job holds has an empty lock file
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def has_type(value: Any, kind: type) -> bool:
    """isinstance for values read from JSON, where a bool is not an int."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
