"""The index folder: `index-<sha>.faiss` files and `index.json`, and how a build commits a new pair.

index.json names the index file in use (with its size and checksum) and says what it is. A build writes its new
index file under a name made from its checksum, then replaces index.json in one atomic rename: that rename is the
commit. A reader sees the old pair or the new pair, never a mix; a build killed at any moment leaves the last
committed pair, and the next build clears what the killed one left.

An index built in shards keeps its inverted lists in a second file, `lists-<sha>.ivfdata`, that searches
memory-map; index.json names it too (with its size and the checksum of its last bytes: the whole file can be far
larger than RAM), and the index file records its name without a folder, so the index folder can move.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError
from retrieval.files import (
    durable_rename,
    has_type,
    is_leftover,
    remove_leftovers,
    sha256_file,
    temporary_name,
    write_json,
)
from retrieval.store import EmbeddingStore, tail_sha256

INDEX_JSON = "index.json"
INDEX_FORMAT = "retrieval.index"
INDEX_VERSION = 2
FILE_DIGEST = 16  # hex digits of the checksum in an index file's name
BUILT_FILE = re.compile(rf"index-[0-9a-f]{{{FILE_DIGEST}}}\.faiss")  # the files a build writes
LISTS_FILE = re.compile(rf"lists-[0-9a-f]{{{FILE_DIGEST}}}\.ivfdata")  # an on-disk index's lists
FILE_NAME = re.compile(rf"{BUILT_FILE.pattern}|index\.faiss")  # what index.json may name (version 1: index.faiss)
# What a reader needs from index.json, with its type; a folder whose index.json lacks one is refused whole.
REQUIRED = {"format": str, "version": int, "count": int, "dim": int, "search_params": str, "store": dict,
            "encoder": dict}
REQUIRED_IN = {"store": {"path": str, "fingerprint": str}, "encoder": {"name": str, "weights_sha256": str}}
OPTIONAL_IN = {"encoder": {"checkpoint": str, "fusion_mode": str}}  # absent or null, or of this type


def is_index_folder(folder: Path) -> bool:
    """An index folder, or what a killed first build left of one (its store, an index file not yet committed)."""
    store = folder / "store"
    return ((folder / INDEX_JSON).is_file() or any(BUILT_FILE.fullmatch(p.name) or LISTS_FILE.fullmatch(p.name)
                                                   for p in folder.iterdir())
            or EmbeddingStore.is_store(store) or (store.is_dir() and _only_leftovers(store)))


def _only_leftovers(folder: Path) -> bool:
    entries = list(folder.iterdir())
    return bool(entries) and all(is_leftover(p) for p in entries)


def write_index_file(index, out: Path) -> tuple[Path, str]:
    """Write the index durably under a name made from its checksum, never over the committed file (unless it
    is the very same bytes); returns its path and sha256."""
    import faiss

    tmp = out / temporary_name("index.faiss")
    try:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as e:  # FAISS reports a failed write (a full disk) this way, the OS's reason last
            reason = re.search(r"\(([^()]*)\)\s*$", str(e))
            raise OSError(errno.EIO, f"FAISS could not write the index: {reason[1] if reason else 'write error'}",
                          str(tmp)) from None
        digest = sha256_file(tmp)
        final = out / f"index-{digest[:FILE_DIGEST]}.faiss"
        durable_rename(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final, digest


def write_lists_file(index, out: Path) -> dict[str, Any]:
    """Name an on-disk index's lists file (merged at a temporary name in `out`) by its checksum, durably, and point
    the index at that name; returns what index.json records of it. Call before write_index_file."""
    from indexers.shards import lists_file, rename_lists

    tmp = Path(lists_file(index))
    digest = sha256_file(tmp)
    final = out / f"lists-{digest[:FILE_DIGEST]}.ivfdata"
    durable_rename(tmp, final)
    rename_lists(index, final.name)
    return {"lists_file": final.name, "lists_bytes": final.stat().st_size, "lists_tail_sha256": tail_sha256(final)}


def commit(out: Path, info: dict[str, Any], previous: str | None) -> None:
    """Make `info` (naming an index file already written) the folder's index: one rename; then tidy up."""
    write_json(out / INDEX_JSON, info)
    if previous and previous != info["file"]:
        (out / previous).unlink(missing_ok=True)
    clear_leftovers(out)


def committed_file(out: Path) -> str | None:
    """The index file that index.json names, if there is a readable index.json."""
    files = committed_files(out)
    return files[0] if files else None


def committed_files(out: Path) -> list[str]:
    """The files that index.json names (the index file, and an on-disk index's lists), if it is readable."""
    try:
        info = read_index_json(out) if (out / INDEX_JSON).is_file() else {}
    except RetrievalError:
        return []
    return [name for name in (info.get("file"), info.get("lists_file")) if name]


def clear_leftovers(out: Path) -> None:
    """Remove what a killed build left: temporary files, and index files of ours that index.json does not name."""
    if not out.is_dir():
        return
    remove_leftovers(out)
    keep = committed_files(out)
    for path in out.iterdir():
        if (BUILT_FILE.fullmatch(path.name) or LISTS_FILE.fullmatch(path.name)) and path.name not in keep:
            path.unlink()


def read_index_json(folder: str | os.PathLike) -> dict[str, Any]:
    """index.json of an index folder, checked: every field a reader relies on is there, with its type."""
    path = Path(folder) / INDEX_JSON
    if not path.is_file():
        raise RetrievalError(f"{folder} is not an index folder (no {INDEX_JSON}); build one with "
                             "`retrieval index build`")
    try:
        info = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise RetrievalError(f"{path} is not valid JSON ({type(e).__name__}); rebuild the index") from None
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise RetrievalError(f"{path} is not an index manifest")
    if info.get("version") == 1:  # before index files were named by their checksum
        info = {"file": "index.faiss", "file_sha256": None} | info
    problems = [f"{key} ({kind.__name__})" for key, kind in REQUIRED.items() if not has_type(info.get(key), kind)]
    problems += [f"{outer}.{key} ({kind.__name__})" for outer, fields in REQUIRED_IN.items()
                 if isinstance(info.get(outer), dict) for key, kind in fields.items()
                 if not has_type(info[outer].get(key), kind)]
    problems += [f"{outer}.{key} ({kind.__name__} or null)" for outer, fields in OPTIONAL_IN.items()
                 if isinstance(info.get(outer), dict) for key, kind in fields.items()
                 if info[outer].get(key) is not None and not isinstance(info[outer][key], kind)]
    if not (isinstance(info.get("file"), str) and FILE_NAME.fullmatch(info["file"])):
        problems.append("file (an index-<sha>.faiss name)")
    if info.get("version") != 1 and not (isinstance(info.get("file_sha256"), str)
                                         and re.fullmatch("[0-9a-f]{64}", info["file_sha256"])
                                         and has_type(info.get("index_bytes"), int)):
        problems.append("file_sha256 and index_bytes (the index file's checksum and size)")
    if "lists_file" in info and not (isinstance(info["lists_file"], str) and LISTS_FILE.fullmatch(info["lists_file"])
                                     and has_type(info.get("lists_bytes"), int)
                                     and re.fullmatch("[0-9a-f]{64}", str(info.get("lists_tail_sha256")))):
        problems.append("lists_file, lists_bytes and lists_tail_sha256 (a lists-<sha>.ivfdata file, its size and "
                        "the checksum of its end)")
    if not problems and (info["count"] < 0 or info["dim"] <= 0):
        problems.append("count ≥ 0 and dim > 0")
    if problems:
        raise RetrievalError(f"{path} is malformed: missing or wrong {', '.join(problems)}; rebuild the index")
    return info



def read_index_file(folder: str | os.PathLike, info: dict[str, Any]):
    """The FAISS index that `info` names, checked against its recorded size, checksum, dim and count."""
    import faiss

    path = Path(folder) / info["file"]
    size = path.stat().st_size  # FileNotFoundError: a build committed since index.json was read (the caller retries)
    if size != info.get("index_bytes", size) or (info["file_sha256"] and sha256_file(path) != info["file_sha256"]):
        raise RetrievalError(f"{path} is damaged: its size or checksum differs from {INDEX_JSON}; rebuild the index")
    try:
        index = read_on_disk(path, info) if "lists_file" in info else faiss.read_index(str(path))
    except RuntimeError as e:
        raise RetrievalError(f"{path} is not a readable FAISS index ({str(e).strip().splitlines()[-1]}); "
                             "rebuild the index") from None
    if index.d != info["dim"] or index.ntotal != info["count"]:
        raise RetrievalError(f"{path} does not match {INDEX_JSON} (dim {index.d}, {index.ntotal} vectors); "
                             "rebuild the index")
    return index


def read_on_disk(path: Path, info: dict[str, Any]):
    """An on-disk index, its lists memory-mapped read-only from the lists file beside it, checked by size and tail.

    FAISS records the lists file by the name it had when the index was written; its own same-folder option prints
    to stdout on every read, so the name (stored as an 8-byte length and the bytes) is replaced here by the path in
    this folder before the header is read from memory."""
    import faiss
    import numpy as np

    lists = path.parent / info["lists_file"]
    if lists.stat().st_size != info["lists_bytes"] or tail_sha256(lists) != info["lists_tail_sha256"]:
        raise RetrievalError(f"{lists} is damaged: its size or checksum differs from {INDEX_JSON}; rebuild the index")
    name = info["lists_file"].encode()
    header = path.read_bytes()
    recorded = struct.pack("<Q", len(name)) + name
    if header.count(recorded) != 1:
        raise RetrievalError(f"{path} does not name its lists file {info['lists_file']}; rebuild the index")
    where = str(lists.resolve()).encode()
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.frombuffer(header.replace(recorded, struct.pack("<Q", len(where)) + where),
                                             dtype=np.uint8), reader.data)
    return faiss.read_index(reader, faiss.IO_FLAG_READ_ONLY)


def read_index_folder(folder: str | os.PathLike, attempts: int = 3) -> tuple[dict[str, Any], Any]:
    """index.json and the FAISS index it names, read as one pair: when a build commits in between (the file
    named is gone), index.json is read again."""
    for attempt in range(attempts):
        info = read_index_json(folder)
        try:
            return info, read_index_file(folder, info)
        except FileNotFoundError as e:  # the index file, or an on-disk index's lists file
            if attempt == attempts - 1 or read_index_json(folder) == info:
                raise RetrievalError(f"{e.filename or Path(folder) / info['file']}, named by {INDEX_JSON}, is "
                                     "missing; rebuild the index") from None
    raise AssertionError("unreachable")
