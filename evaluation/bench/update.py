"""`retrieval bench update`: what following a changing corpus costs and what it does to an approximate index.

Two measurements, side by side in one process:
- add: `index add` of M new items to an index of N (encode the new items, commit, add to FAISS) against building
  the index of all N + M from scratch (encode everything, build), with the same model; items/s of each.
- drift: an IVF index trained on N synthetic embedding-like vectors, then given 50 %, 100 % and 200 % more through
  the store and `sync`, with its quantiser and nprobe as built; ann_recall@10 (what `index add` measures and
  records; before any add, measured the same way) after each, for new vectors from the same distribution and
  from a shifted one (another subspace and other clusters).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from evaluation.bench.index import DATABASE, QUERIES, synthetic_vectors

SHARES = (0.5, 1.0, 2.0)
PART_ROWS = 50_000


def write_vectors(store: Path, vectors: np.ndarray, first_row: int, first_part: int) -> list[dict[str, Any]]:
    """Write vectors as parts of a store (rows from `first_row`); returns their manifest entries."""
    from retrieval.store import embedding_array, write_part
    from retrieval.store_manifest import part_name

    entries = []
    for i, lo in enumerate(range(0, len(vectors), PART_ROWS)):
        chunk = vectors[lo:lo + PART_ROWS]
        rows = np.arange(first_row + lo, first_row + lo + len(chunk), dtype=np.int64)
        table = pa.table({"row": rows, "id": [f"v{r}" for r in rows], "image": pa.nulls(len(rows), pa.string()),
                          "text": pa.nulls(len(rows), pa.string()), "embedding": embedding_array(chunk, "float32")})
        name = part_name(first_part + i)
        entries.append({"file": name, "count": len(rows), "rows": [int(rows[0]), int(rows[-1]) + 1]}
                       | write_part(store / name, table))
    return entries


def vector_store(store: Path, vectors: np.ndarray, encoder: dict[str, Any] | None = None) -> None:
    """A complete store of synthetic vectors (no model: its encoder is named `synthetic`, unless `encoder` gives
    one of `vectors`' dimension to search it with)."""
    from retrieval.store import write_manifest
    from retrieval.store_manifest import FORMAT, VERSION

    store.mkdir(parents=True)
    parts = write_vectors(store, vectors, 0, 0)
    write_manifest(store, {"format": FORMAT, "version": VERSION, "dim": vectors.shape[1], "dtype": "float32",
                           "encoder": encoder or {"name": "synthetic", "weights_sha256": "0" * 64}, "parts": parts,
                           "count": len(vectors), "complete": True, "part_size": PART_ROWS,
                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def bench_drift(n: int = 100_000, dim: int = 256, key: str | None = None, seed: int = 0,
                progress: bool = False) -> dict[str, Any]:
    """ann_recall@10 of an IVF index after adds of SHARES × n vectors, same and shifted distribution."""
    from indexers.kinds import IVF_KEY
    from retrieval.index_folder import read_index_folder
    from retrieval.index_update import measured_recall, sync
    from retrieval.indexing import build_index_folder
    from retrieval.store import EmbeddingStore
    from retrieval.store_manifest import next_part, next_row
    from retrieval.store_versions import commit_version

    key = key or f"IVF{int(4 * n ** 0.5)},Flat"
    if not IVF_KEY.search(key):
        raise ValueError(f"bench update drifts an IVF index, not {key!r}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        base = Path(tmp) / "base"
        vector_store(base / "store", synthetic_vectors(n, dim, seed, DATABASE))
        built = build_index_folder(base / "store", base, index_key=key, progress=progress)
        info, index = read_index_folder(base)
        start = measured_recall(index, EmbeddingStore(base / "store"), info["search_params"], None)
        rows.append({"added": "none", "share": 0.0, "vectors": n, "ann_recall@10": round(start, 4),
                     "rebuild_advised": False, "sync_seconds": 0.0})
        for label, new_seed in (("same", seed), ("shifted", seed + 1)):
            folder = Path(tmp) / label
            shutil.copytree(base, folder)
            store = folder / "store"
            added = 0
            for share in SHARES:
                want = int(share * n) - added
                vectors = synthetic_vectors(want, dim, new_seed, QUERIES + len(rows))
                manifest = EmbeddingStore(store).manifest
                parts = write_vectors(store, vectors, next_row(manifest), next_part(manifest))
                commit_version(store, {"change": "add", "added": want}, parts=parts)
                started = time.perf_counter()
                sync(folder)
                seconds = time.perf_counter() - started
                added += want
                info = json.loads((folder / "index.json").read_text())
                rows.append({"added": label, "share": share, "vectors": n + added,
                             "ann_recall@10": info["drift"]["ann_recall@10"],
                             "rebuild_advised": info["drift"]["rebuild_advised"], "sync_seconds": round(seconds, 2)})
    return {"n": n, "dim": dim, "key": key, "search_params": built["search_params"],
            "built_recall@10": built["ann_recall@10"], "target_recall": built["target_recall"], "rows": rows}


def bench_add(model: str, n: int = 2000, add: int = 500, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Seconds and items/s of `index add` of `add` items to an index of n, against a full build of n + add."""
    from evaluation.shapesworld import make_shapesworld
    from retrieval.index_changes import add_items
    from retrieval.indexing import build_index_folder

    options = {"workers": 0}
    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        root = make_shapesworld(Path(tmp) / "data", n=n + add, size=64, seed=seed, train_pairs=False,
                                progress=False).parent
        lines = (root / "corpus.jsonl").read_text().splitlines(keepends=True)
        (root / "first.jsonl").write_text("".join(lines[:n]))
        (root / "more.jsonl").write_text("".join(lines[n:]))
        build_index_folder(root / "first.jsonl", Path(tmp) / "grown", model=model, index_key="Flat",
                           progress=progress, encode_options=options)
        started = time.perf_counter()
        add_items(Path(tmp) / "grown", root / "more.jsonl", progress=progress, **options)
        add_seconds = time.perf_counter() - started
        started = time.perf_counter()
        build_index_folder(root / "corpus.jsonl", Path(tmp) / "full", model=model, index_key="Flat",
                           progress=progress, encode_options=options)
        full_seconds = time.perf_counter() - started
    return {"model": model, "n": n, "add": add, "add_seconds": round(add_seconds, 2),
            "add_items_per_s": round(add / add_seconds, 1), "rebuild_seconds": round(full_seconds, 2),
            "rebuild_items_per_s": round((n + add) / full_seconds, 1), "speedup": round(full_seconds / add_seconds, 2)}


def report_lines(report: dict[str, Any]) -> list[str]:
    out = []
    if add := report.get("add"):
        out += [f"index add of {add['add']} items to {add['n']} ({add['model']}, Flat) against a full build of "
                f"{add['n'] + add['add']}:",
                f"  add      {add['add_seconds']:8.2f} s  {add['add_items_per_s']:8.1f} new items/s",
                f"  rebuild  {add['rebuild_seconds']:8.2f} s  {add['rebuild_items_per_s']:8.1f} items/s",
                f"  the add takes {1 / add['speedup']:.2f}× the rebuild's time ({add['speedup']:.1f}× faster)"]
    if drift := report.get("drift"):
        out += [f"{drift['key']} trained on {drift['n']} vectors (dim {drift['dim']}), {drift['search_params']}, "
                f"ann_recall@10 {drift['built_recall@10']:.3f} at build (target {drift['target_recall']}):",
                "  added     share  vectors  ann_recall@10  rebuild advised  sync s"]
        out += [f"  {r['added']:8s} {r['share']:5.0%}  {r['vectors']:7d}  {r['ann_recall@10']:13.3f}  "
                f"{'yes' if r['rebuild_advised'] else 'no':15s}  {r['sync_seconds']:6.2f}" for r in drift["rows"]]
    return out
