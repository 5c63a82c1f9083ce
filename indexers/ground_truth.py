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


def ann_recall(found: np.ndarray, found_scores: np.ndarray, truth: np.ndarray, truth_scores: np.ndarray,
               k: int, tie: float = 1e-6) -> float:
    """Tie-aware k-recall@k: the mean share of the k answers that belong in the exact top k.

    An answer belongs when it is one of the exact top k, or when its score equals the exact k-th score
    (within `tie`): with near-duplicate items the exact top k is one of several equally right sets.
    """
    shares = []
    for f, fs, t, ts in zip(found[:, :k], found_scores[:, :k], truth[:, :k], truth_scores[:, :k]):
        valid_t = t >= 0
        if not valid_t.any():
            continue
        kth = ts[valid_t].min()
        right = np.isin(f, t[valid_t]) | ((f >= 0) & (fs >= kth - tie))
        shares.append(min(right.sum(), valid_t.sum()) / valid_t.sum())
    return float(np.mean(shares)) if shares else 1.0
