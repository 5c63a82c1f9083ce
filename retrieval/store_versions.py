"""Committing a store's next version: parts added, rows deleted, parts compacted; and dropping old versions.

Files first, manifest last: a new part or deletion file is written (atomically) before the manifest that names
it, so a writer killed at any moment leaves the last committed version whole, plus files no version names, which
`clear_unlisted` removes. Callers hold the store folder's lock (retrieval.files.folder_lock).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.errors import RetrievalError
from retrieval.files import atomic_path, remove_leftovers, sha256_file
from retrieval.store import EmbeddingStore, reading, write_manifest, write_part
from retrieval.store_manifest import (
    DELETION_FILE,
    PART_FILE,
    current_version,
    deletion_name,
    live_count,
    manifest_problem,
    next_part,
    next_row,
    part_name,
)


def clear_unlisted(store: Path) -> None:
    """Remove what killed writers left: temporary files, and part or deletion files the manifest does not list."""
    listed = {e["file"] for key in ("parts", "deletions") for e in EmbeddingStore(store).manifest.get(key, [])}
    remove_leftovers(store)
    for path in store.iterdir():
        if (PART_FILE.fullmatch(path.name) or DELETION_FILE.fullmatch(path.name)) and path.name not in listed:
            path.unlink()


def commit_version(store: Path, change: dict[str, Any], parts: list[dict[str, Any]] = (),
                   deleted: np.ndarray | None = None, replaced: list[str] = (),
                   drop_deletions: bool = False) -> int:
    """Commit the next version: `parts` (entries of part files already in the folder) added, `deleted` (live row
    ids) recorded in a new deletion file, the `replaced` parts and, with `drop_deletions`, the deletion files
    of the current version left out. Returns the new version number."""
    manifest = EmbeddingStore(store).manifest
    version = current_version(manifest) + 1
    for part in parts:
        manifest["parts"].append(part | {"added": version})
    for part in manifest["parts"]:
        if part["file"] in replaced and part.get("removed") is None:
            part["removed"] = version
    if drop_deletions:
        for deletion in manifest.get("deletions", []):
            if deletion.get("removed") is None:
                deletion["removed"] = version
    if deleted is not None and len(deleted):
        manifest.setdefault("deletions", []).append(_write_deletions(store, version, deleted))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest |= {"store_version": version, "count": live_count(manifest, version), "updated": now}
    manifest.setdefault("versions", [{"version": 1, "change": "encode", "created": manifest.get("created")}])
    manifest["versions"].append({"version": version, **change, "count": manifest["count"], "created": now})
    if problem := manifest_problem(manifest):  # our own bug, caught before it is committed
        raise RetrievalError(f"refusing to commit version {version} of store {store}: {problem}")
    write_manifest(store, manifest)
    return version


def _write_deletions(store: Path, version: int, rows: np.ndarray) -> dict[str, Any]:
    path = store / deletion_name(version)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"row": pa.array(np.sort(rows).astype(np.int64))}), tmp)
    return {"file": path.name, "count": int(len(rows)), "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "added": version}


def compacted_parts(store: EmbeddingStore) -> tuple[list[dict[str, Any]], list[str]]:
    """Rewrite every part of the store's version that holds deleted rows without them, as new part files;
    returns (their entries, the parts they replace). A part left with no rows is replaced by nothing, unless
    every part is: the first then stays as a part of no rows, which keeps the store's columns."""
    emptied, kept, replaced = [], [], []
    for part in store.parts:
        keep = ~np.isin(store.part_rows(part), store.deleted)
        if not keep.all():
            replaced.append(part["file"])
            (kept if keep.any() else emptied).append((part, keep))
    if emptied and not kept and len(replaced) == len(store.parts):
        kept = emptied[:1]
    number = next_part(store.manifest)
    return [_rewritten(store, part, keep, part_name(number + i)) for i, (part, keep) in enumerate(kept)], replaced


def _rewritten(store: EmbeddingStore, part: dict[str, Any], keep: np.ndarray, name: str) -> dict[str, Any]:
    path = store.path / part["file"]
    with reading(path):
        table = pq.read_table(path, page_checksum_verification=True).filter(pa.array(keep))
    kept = {k: v for k, v in part.items() if k not in ("file", "count", "sha256", "bytes", "tail_sha256", "added",
                                                        "removed", "errors", "positions")}
    return kept | {"file": name, "count": table.num_rows, "compacted_from": part["file"]} \
        | write_part(store.path / name, table)


def prune(store: Path, keep_from: int) -> list[str]:
    """Forget the versions before `keep_from` and delete the files only they used; returns those files."""
    manifest = EmbeddingStore(store).manifest
    gone = [e["file"] for key in ("parts", "deletions") for e in manifest.get(key, [])
            if e.get("removed") is not None and e["removed"] <= keep_from]
    if not gone:
        return []
    manifest |= {"next_row": next_row(manifest), "next_part": next_part(manifest)}  # never given again
    for key in ("parts", "deletions"):
        manifest[key] = [e for e in manifest.get(key, []) if e["file"] not in gone]
    manifest["oldest_version"] = keep_from
    write_manifest(store, manifest)
    for name in gone:
        (store / name).unlink(missing_ok=True)
    return gone
