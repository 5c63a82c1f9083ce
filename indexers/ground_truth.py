"""Exact top-k over streamed batches, and the recall of an approximate index against it, judged by exact scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
Rescore = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (query rows, ids) -> exact scores
TIE = 1e-6
TRUTH_MARGIN = 10  # exact neighbours kept beyond k, so that ties are judged by exact scores without rescoring


def exact_search(queries: np.ndarray, batches: Batches, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of `queries` over every (ids, vectors) batch, in bounded memory."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in batches():
        if not len(ids):  # every row of it held out
            continue
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


def rescorer(queries: np.ndarray, batches: Batches) -> Rescore:
    """Exact scores of (query row, id) pairs, read from the vectors themselves in one pass over the batches for
    the pairs not scored before (tuning asks about much the same ids at every setting)."""
    known: dict[tuple[int, int], float] = {}

    def rescore(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        new = [j for j, pair in enumerate(zip(rows.tolist(), ids.tolist())) if pair not in known]
        if new:
            wanted_rows, wanted = rows[new], ids[new]
            found = np.full(len(new), -np.inf, dtype=np.float32)
            for batch_ids, vectors in batches():
                hit = np.flatnonzero(np.isin(wanted, batch_ids))
                if len(hit):
                    order = np.argsort(batch_ids)
                    at = order[np.searchsorted(batch_ids, wanted[hit], sorter=order)]
                    found[hit] = np.einsum("ij,ij->i", queries[wanted_rows[hit]],
                                           np.asarray(vectors, dtype=np.float32)[at])
            known.update(zip(zip(wanted_rows.tolist(), wanted.tolist()), found.tolist()))
        return np.array([known[pair] for pair in zip(rows.tolist(), ids.tolist())], dtype=np.float32)
    return rescore


CONFIDENCE_Z = 1.645  # one-sided 95 %


@dataclass(frozen=True)
class Recall:
    plain: float  # the share of the exact top-k ids returned
    fair: float  # the share of returned ids whose EXACT score reaches the exact k-th score: ties are right too
    error: float = 0.0  # the standard error of `fair` over the queries

    def reaches(self, target: float) -> bool:
        return reaches(self.fair, self.error, target)


def reaches(recall: float, error: float, target: float) -> bool:
    """Whether a recall measured with this standard error reaches `target` with 95 % confidence: the queries are a
    sample of those to come."""
    return recall - CONFIDENCE_Z * error >= target


def recall_at_k(found: np.ndarray, truth: np.ndarray, truth_scores: np.ndarray, k: int,
                rescore: Rescore | None = None, tie: float = TIE) -> Recall:
    """k-recall@k of `found` ids against the exact neighbours `truth` (best first, at least k deep).

    Every returned id is judged by its exact similarity, never by the index's approximate score (which runs
    high for quantised codes and would count near misses as ties): an id in the truth list has its exact score
    there; one outside a list that ends below the tie is wrong; the rest (a run of ties longer than the list) are
    rescored exactly by `rescore`, or counted wrong without it. A returned duplicate counts once.
    """
    plain, fair_counts, wants, kths, pending = [], [], [], [], []
    for q, (f, t, ts) in enumerate(zip(found[:, :k], truth, truth_scores)):
        valid = t >= 0
        want = min(k, int(valid.sum()))
        if want == 0:
            continue
        t, ts = t[valid], ts[valid]
        kth = ts[want - 1]
        returned = np.unique(f[f >= 0])
        plain.append(len(np.intersect1d(returned, t[:want])) / want)
        known = dict(zip(t.tolist(), ts.tolist()))
        right = 0
        for i in returned.tolist():
            if i in known:
                right += known[i] >= kth - tie
            elif ts[-1] >= kth - tie:  # the list may end inside a run of ties: ask the vectors
                pending.append((len(fair_counts), q, i))
        fair_counts.append(right)
        wants.append(want)
        kths.append(kth)
    if pending and rescore is not None:
        slots, rows, ids = (np.array(x, dtype=np.int64) for x in zip(*pending))
        for slot, score in zip(slots, rescore(rows, ids)):
            fair_counts[slot] += score >= kths[slot] - tie
    if not wants:
        return Recall(1.0, 1.0)
    fair = [min(c, w) / w for c, w in zip(fair_counts, wants)]
    error = float(np.std(fair, ddof=1) / np.sqrt(len(fair))) if len(fair) > 1 else 0.0
    return Recall(float(np.mean(plain)), float(np.mean(fair)), error)
