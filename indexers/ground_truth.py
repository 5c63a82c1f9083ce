"""Exact top-k over streamed batches, and ANN fidelity against it."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def exact_search(queries: np.ndarray, batches: Batches, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of `queries` over every (ids, vectors) batch, in bounded memory."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in batches():
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        scores, positions = flat.search(queries, min(k, len(ids)))
        found = np.where(positions >= 0, ids[np.clip(positions, 0, None)], -1)
        if scores.shape[1] < k:  # pad a short batch so the heap sees k columns
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(scores.astype(np.float32), found.astype(np.int64))
    heap.finalize()
    return heap.D, heap.I


def ann_recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """k-recall@k: the mean share of the exact top k that the index also returned in its top k."""
    hits = [len(set(f[:k]) & set(t[:k]) - {-1}) / max(1, len(set(t[:k]) - {-1})) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0
