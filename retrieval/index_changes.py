"""The changes a user makes to an index: add items, delete items, compact, rebuild (the CLI's `retrieval index
add / delete / compact / rebuild` and `SearchIndex.add / delete / compact`). Each one changes the store and then
lets the index follow (retrieval.index_update), so each can be killed at any moment and run again."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.index_folder import read_index_json
from retrieval.index_update import rebuild_from, sync, updating
from retrieval.store import EmbeddingStore
from retrieval.store_versions import commit_version, compacted_parts, prune

MAX_IDS_FILE = 1 << 30


def add_items(folder: str | os.PathLike, items: str | os.PathLike | list[dict[str, Any]], upsert: bool = False,
              batch_size: int = 256, workers: int | None = None, strict: bool = False, device: str = "auto",
              progress: bool = True, follow_symlinks: bool = False, root_only: bool = False,
              encoder=None) -> list[str]:
    """Encode the items of a corpus (a path, or a list of dicts) that the index lacks with the index's encoder, add
    them to its store and to the index; returns lines for the user."""
    from retrieval.corpus import corpus_from_records, read_corpus
    from retrieval.encode import check_encode_options
    from retrieval.search import load_index_encoder
    from retrieval.store_add import finish, plan_add, replaced_rows, stage

    started = time.perf_counter()
    folder = Path(folder)
    check_encode_options(batch_size=batch_size, workers=workers)
    info = read_index_json(folder)
    corpus = (corpus_from_records(items, follow_symlinks=follow_symlinks, root_only=root_only)
              if isinstance(items, list) else read_corpus(items, follow_symlinks=follow_symlinks, root_only=root_only))
    encoder = encoder or load_index_encoder(info, device)
    if encoder.weights_sha256 != info["encoder"]["weights_sha256"]:
        raise RetrievalError(f"the encoder given is not the one index {folder} was built with")
    with updating(folder, "add", progress) as (store_path, notes):
        store = EmbeddingStore(store_path)
        plan = plan_add(store, corpus, upsert)
        entries, summary = stage(plan, store, encoder, batch_size, workers, strict, progress, started)
        added, replaced = sum(e["count"] for e in entries), replaced_rows(plan, store_path, entries)
        if added:
            commit_version(store_path, {"change": "add", "added": added, "replaced": len(replaced),
                                        "source": str(corpus.source)}, parts=entries, deleted=replaced)
        finish(store_path)
        notes += sync(folder, progress)
    store = EmbeddingStore(store_path)
    lines = [f"index {folder}: added {added} (replacing {len(replaced)}), unchanged {plan.unchanged}, "
             f"skipped {summary.errors if summary else 0}; store version {store.version} holds {store.count} items "
             f"({time.perf_counter() - started:.1f} s)"]
    if summary and summary.error_reasons:
        lines += [f"  skipped: {n} × {reason}" for reason, n in sorted(summary.error_reasons.items())]
    return lines + [f"note: {note}" for note in notes]


def delete_items(folder: str | os.PathLike, ids: list[str] | None = None, where: str | None = None,
                 progress: bool = False) -> list[str]:
    """Delete the items with these ids, or those a SQL predicate over the store's columns picks, from the index
    and its store (recorded as deleted; `compact` reclaims the space); returns lines for the user."""
    from retrieval.filter_worker import FilterWorker

    if (ids is None) == (where is None):
        raise RetrievalError("say what to delete: --ids FILE or --where SQL (one of them)")
    folder = Path(folder)
    with updating(folder, "delete", progress) as (store_path, notes):
        store = EmbeddingStore(store_path)
        table = store.metadata()
        if ids is not None:
            row_of = dict(zip(table["id"].to_pylist(), table["row"].to_pylist()))
            rows = np.unique(np.array([row_of[i] for i in ids if i in row_of], np.int64))
            missing = len(set(ids) - row_of.keys())
        else:
            worker = FilterWorker(table)
            try:
                rows, missing = worker.rows(where), 0
            finally:
                worker.close()
        if len(rows):
            commit_version(store_path, {"change": "delete", "deleted": len(rows)}, deleted=rows)
            notes += sync(folder, progress)
    store = EmbeddingStore(store_path)
    lines = [f"index {folder}: deleted {len(rows)}" + (f" (ids not in it: {missing})" if missing else "")
             + f"; store version {store.version} holds {store.count} items"]
    return lines + [f"note: {note}" for note in notes]


def read_ids(path: str | os.PathLike) -> list[str]:
    """Ids, one per line, from a UTF-8 text file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_IDS_FILE:
            raise RetrievalError(f"--ids {path} is over {MAX_IDS_FILE >> 30} GB")
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first id
    except FileNotFoundError:
        raise RetrievalError(f"--ids file not found: {path}") from None
    except UnicodeDecodeError:
        raise RetrievalError(f"--ids {path} is not UTF-8 text (one id per line)") from None
    except OSError as e:
        raise RetrievalError(f"cannot read --ids {path}: {e.strerror or e}") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def compact_index(folder: str | os.PathLike, progress: bool = False) -> list[str]:
    """Rewrite the store's parts without their deleted rows, rebuild an index that still holds them, and delete
    the files only older versions used; returns lines for the user."""
    folder = Path(folder)
    with updating(folder, "compact", progress) as (store_path, notes):
        before = folder_bytes(folder, store_path)
        store = EmbeddingStore(store_path)
        entries, replaced = compacted_parts(store) if store.deletions else ([], [])
        if store.deletions:
            commit_version(store_path, {"change": "compact", "rewritten": len(replaced),
                                        "dropped": len(store.deleted)},
                           parts=entries, replaced=replaced, drop_deletions=True)
            notes += sync(folder, progress)
        gone = prune(store_path, EmbeddingStore(store_path).version)
        after = folder_bytes(folder, store_path)
    lines = [f"index {folder}: rewrote {len(replaced)} of {len(store.parts)} parts without the "
             f"{len(store.deleted)} deleted rows, removed {len(gone)} old files; "
             f"{before / 2**20:.2f} MB → {after / 2**20:.2f} MB on disk"]
    return lines + [f"note: {note}" for note in notes]


def rebuild_index(folder: str | os.PathLike, index_key: str | None = None, progress: bool = True) -> list[str]:
    """Build the index again over its store's newest live rows (retraining an approximate index's quantiser)."""
    folder = Path(folder)
    with updating(folder, "rebuild", progress, follow=False) as (_, notes):
        notes += rebuild_from(folder, read_index_json(folder), progress, "asked for", index_key)
    return notes


def sync_index(folder: str | os.PathLike, progress: bool = False) -> list[str]:
    """Bring an index up to its store's newest version (after changes made through another index over the same
    store); returns lines for the user."""
    folder = Path(folder)
    with updating(folder, "sync", progress, follow=False) as (store_path, notes):
        before = read_index_json(folder)["store"].get("version", 1)
        notes = sync(folder, progress) + notes
    now = EmbeddingStore(store_path)
    return [f"index {folder}: at store version {now.version} (it was at {before}), {now.count} items"] + \
        [f"note: {note}" for note in notes]


def folder_bytes(*folders: Path) -> int:
    """Bytes of the files under the folders, each file counted once."""
    seen = {}
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                seen[path.resolve()] = path.stat().st_size
    return sum(seen.values())

