"""Keeping an index in step with a changing store: `retrieval index add / delete / compact / rebuild`.

Each change is made to the store first, as its next version (retrieval.store_versions); then the index follows
(`sync`): rows added since the version it reflects are added to the FAISS index, rows deleted are removed from it
(FAISS `remove_ids` where the index kind can; where it cannot, e.g. HNSW, they stay in the file and searches pass
them by with an id selector built from the store's deletion vectors), and index.json is committed naming the new
version. Until that commit, searches answer from the version index.json names, which the store still holds.

A change killed at any moment and run again first brings the index up to the store, then finds its own work done
or does it: an add skips items already live with the same content, a delete ignores rows already gone, a compaction
finds nothing left to rewrite and only drops what the old versions used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import RetrievalError, indexer_errors
from retrieval.files import folder_lock
from retrieval.index_folder import clear_leftovers, commit, read_index_folder, read_index_json, write_index_file
from retrieval.store import EmbeddingStore, VersionGone
from retrieval.store_versions import clear_unlisted

ADD_BATCH = 65_536
RECALL_QUERIES = 1000


def store_path_of(folder: Path, info: dict[str, Any]) -> Path:
    path = Path(info["store"]["path"])
    return path if path.is_absolute() else folder / path


@contextlib.contextmanager
def updating(folder: str | os.PathLike, what: str, progress: bool = False,
             follow: bool = True) -> Iterator[tuple[Path, list[str]]]:
    """Hold the index folder's lock and its store's, clear what killed changes left, and (with `follow`) bring the
    index up to the store; yields the store's path and notes for the user."""
    folder = Path(folder)
    store = store_path_of(folder, read_index_json(folder))
    with folder_lock(folder, f"index {what}"), folder_lock(store, f"index {what} (its store)"):
        clear_leftovers(folder)
        clear_unlisted(store)
        EmbeddingStore(store).require_intact()
        notes = sync(folder, progress) if follow else []
        if not store.resolve().is_relative_to(folder.resolve()):
            notes.append(f"the store {store} is outside this index: other indexes over it follow its changes with "
                         "`retrieval index sync`")
        yield store, notes


@indexer_errors()
def sync(folder: Path, progress: bool = False) -> list[str]:
    """Bring the index up to its store's newest version; returns notes (a recall drop after adds)."""
    import faiss

    info = read_index_json(folder)
    store_path = store_path_of(folder, info)
    now = EmbeddingStore(store_path)
    at = info["store"].get("version", 1)
    if now.version < at:
        raise RetrievalError(f"store {store_path} is at version {now.version}, before the version {at} this index "
                             f"reflects: it was replaced; run `retrieval index rebuild {folder}`")
    try:
        old = EmbeddingStore(store_path, version=at)
    except VersionGone:
        raise RetrievalError(f"this index reflects version {at} of store {store_path}, which the store no longer "
                             f"holds (another index over it compacted it); run `retrieval index rebuild {folder}`"
                             ) from None
    if old.fingerprint() != info["store"]["fingerprint"]:
        raise RetrievalError(f"store {store_path} changed since this index was built; run "
                             f"`retrieval index rebuild {folder}`")
    if now.version == at:
        return []
    if info.get("lists_file"):  # its committed lists are read-only: a sharded index follows by a new build
        return rebuild_from(folder, info, progress, f"store version {now.version}")
    info, index = read_index_folder(folder)  # read only when there is something to follow
    removal = info.get("removal")
    if removal == "selector" and {d["file"] for d in old.deletions} - {d["file"] for d in now.deletions}:
        return rebuild_from(folder, info, progress, "its deleted rows were compacted away")
    added = np.setdiff1d(now.live_rows(), old.live_rows(), assume_unique=True)
    removed = np.setdiff1d(old.live_rows(), now.live_rows(), assume_unique=True)
    if len(removed) and removal != "selector":
        try:
            index.remove_ids(faiss.IDSelectorBatch(removed))
            removal = "remove_ids"
        except RuntimeError:  # this kind cannot remove (HNSW, refine, fast-scan): search around them instead
            removal = "selector"
    for lo in range(0, len(added), ADD_BATCH):
        chunk = added[lo:lo + ADD_BATCH]
        index.add_with_ids(now.read_vectors(chunk), chunk)
    update: dict[str, Any] = {"version": now.version, "added": len(added), "removed": len(removed)}
    notes = []
    if len(added) and approximate(index):
        recall = measured_recall(index, now, info["search_params"], removal)
        share = (index.ntotal - info.get("built_count", info["count"])) / max(info.get("built_count", 1), 1)
        update["ann_recall@10"] = round(recall, 4)
        info["drift"] = {"ann_recall@10": round(recall, 4), "added_since_build": round(share, 3),
                         "rebuild_advised": recall < info.get("target_recall", 0.95)}
        if info["drift"]["rebuild_advised"]:
            notes.append(f"ann_recall@10 is now {recall:.3f} (target {info.get('target_recall', 0.95)}), "
                         f"with {share:.0%} more vectors than the index was trained on: rebuild it with "
                         f"`retrieval index rebuild {folder}`")
    previous = info["file"]
    index_file, digest = write_index_file(index, folder)
    info |= {"file": index_file.name, "file_sha256": digest, "index_bytes": index_file.stat().st_size,
             "count": int(index.ntotal), "removal": removal,
             "store": info["store"] | {"version": now.version, "fingerprint": now.fingerprint(), "count": now.count},
             "updates": [*info.get("updates", []), update]}
    commit(folder, info, previous)
    return notes


def approximate(index) -> bool:
    from indexers.kinds import tuning

    return bool(tuning(index, 10))


def measured_recall(index, store: EmbeddingStore, params: str, removal: str | None) -> float:
    """ann_recall@10 of the index now, as the build measures it: stored vectors as queries, each left out of both
    the exact search of the live rows and the index's answers (so that it cannot find itself)."""
    import faiss

    from indexers.build import held_out
    from indexers.ground_truth import TRUTH_MARGIN, exact_search, recall_at_k, rescorer
    from indexers.kinds import selector_params

    rows, queries = store.sample(RECALL_QUERIES, seed=4)
    others = held_out(store.iter_batches, rows)
    truth = exact_search(queries, others, 10 + TRUTH_MARGIN)
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    left_out = np.union1d(rows, store.deleted) if removal == "selector" else rows
    inner = faiss.IDSelectorBatch(left_out)
    search = selector_params(index, faiss.IDSelectorNot(inner), params)
    if search is not None:
        found = index.search(queries, 10, params=search)[1]
    else:  # a kind that takes no selector: one more, less the query itself
        more = index.search(queries, 11)[1]
        found = np.array([[i for i in found if i != row][:10] for found, row in zip(more, rows)])
    return recall_at_k(found, truth[1], truth[0], 10, rescorer(queries, others)).fair


def rebuild_from(folder: Path, info: dict[str, Any], progress: bool, why: str,
                 index_key: str | None = None) -> list[str]:
    """Build the index again over its store's newest version, with its key (or `index_key`), recall target and
    memory budget; the caller holds the folder's lock."""
    from retrieval.indexing import _build

    if not EmbeddingStore(store_path_of(folder, info)).count:
        return [empty_index(folder, info, why)]
    built = _build(store_path_of(folder, info), folder, None, index_key or info.get("index_key", "auto"), "auto",
                   info.get("memory_budget", "4GB"), info.get("target_recall", 0.95), progress, {}, "latency",
                   shards=info.get("shards"))
    return [f"rebuilt the index ({why}): {built['index_key']} over {built['count']} vectors, "
            f"ann_recall@10 {built['ann_recall@10']:.3f}"]


def empty_index(folder: Path, info: dict[str, Any], why: str) -> str:
    """Commit an empty exact index for a store with no live rows (there is nothing to train an approximate one on;
    `index rebuild` makes one again once items are added)."""
    import faiss

    from indexers.kinds import factory_string

    store = EmbeddingStore(store_path_of(folder, info))
    index = faiss.index_factory(info["dim"], factory_string("Flat"), faiss.METRIC_INNER_PRODUCT)
    index_file, digest = write_index_file(index, folder)
    previous = info["file"]
    for key in ("lists_file", "lists_bytes", "lists_tail_sha256", "shards"):  # an exact index keeps no lists
        info.pop(key, None)
    info |= {"file": index_file.name, "file_sha256": digest, "index_bytes": index_file.stat().st_size, "count": 0,
             "index_key": "Flat", "factory": factory_string("Flat"), "search_params": "", "removal": None,
             "built_count": 0, "store": info["store"] | {"version": store.version, "fingerprint": store.fingerprint(),
                                                          "count": 0}}
    commit(folder, info, previous)
    return f"the store holds no items ({why}): the index is now an empty exact one; after adding items, " \
           f"`retrieval index rebuild {folder} --index-key auto` chooses again"
