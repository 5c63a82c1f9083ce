"""Benchmark items embedded once per encoder: through the corpus encode job (batched, resumable) into an
embedding store under the cache folder, named by the items, their image files and the encoder's checksum —
so a rerun, or a second benchmark run with the same model, reads the vectors instead of computing them."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from evaluation.tasks import Item
from retrieval.cache import cache_root
from retrieval.errors import RetrievalError
from retrieval.files import LOCK_FILE, folder_lock

Key = tuple[str | None, str | None]  # (image path, text)
WORKERS_FROM = 2_000  # below this many items, loader processes cost more than they save


def _cache_folder(benchmark: str, items: list[Item], encoder, follow_symlinks: bool) -> Path:
    """Named by everything the vectors depend on: the encoder (weights, config, fusion mode), the device kind (CUDA
    runs in bf16 autocast), the symlink rule, and each item with its image file's identity."""
    digest = hashlib.sha256(json.dumps([encoder.describe(), str(encoder.device).split(":")[0], follow_symlinks],
                                       sort_keys=True, default=str).encode())
    for item in items:
        stat = os.stat(item.image) if item.image and os.path.isfile(item.image) else None
        identity = stat and [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]  # ctime: any rewrite
        digest.update(json.dumps([item.image, item.text, identity]).encode())
    return cache_root() / "benchmarks" / benchmark / digest.hexdigest()[:32]


def embed_items(benchmark: str, root: Path, items: list[Item], encoder, batch_size: int = 128,
                progress: bool = True, follow_symlinks: bool = False) -> dict[Key, np.ndarray]:
    """Unit vectors of `items` (keyed by (image, text)) under `encoder`, encoded or read from the cache.
    Images must lie under `root` (through symlinks only with `follow_symlinks`)."""
    from retrieval.corpus import corpus_from_records
    from retrieval.encode import encode_items
    from retrieval.store import ERRORS, EmbeddingStore, vectors_of

    folder = _cache_folder(benchmark, items, encoder, follow_symlinks)
    with folder_lock(folder, f"{benchmark} benchmark encode", wait=True):
        if not (EmbeddingStore.is_store(folder) and EmbeddingStore(folder).complete):
            corpus = corpus_from_records([{"id": str(n), "image": it.image, "text": it.text}
                                          for n, it in enumerate(items)],
                                         root=root, follow_symlinks=follow_symlinks, root_only=True)
            encode_items(corpus, folder, encoder, batch_size, None if len(items) >= WORKERS_FROM else 0,
                         "float32", strict=False, part_size=10_000, progress=progress, sparse_codes=False,
                         started=time.perf_counter())
        store = EmbeddingStore(folder)
        if store.manifest.get("errors"):
            errors = pq.read_table(folder / ERRORS, columns=["error"]).column("error").to_pylist()
            for path in folder.iterdir():  # not kept: the next run tries every item again
                if path.name != LOCK_FILE:
                    path.unlink()
            raise RetrievalError(f"{benchmark}: {len(errors)} of {len(items)} items could not be embedded; the "
                                 f"first: {errors[0]}")
        table = store.read_table(columns=["id", "embedding"])
    vectors = vectors_of(table.column("embedding"), store.dim)
    by_position = dict(zip((int(i) for i in table.column("id").to_pylist()), vectors))
    return {(it.image, it.text or None): by_position[n] for n, it in enumerate(items)}
