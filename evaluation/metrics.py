"""Ranking metrics with separate names: hit@k, recall@k, mrr, top-1 accuracy.

hit@k — some positive is in the top k (what UniIR, MMEB, CIRR, FashionIQ and the COCO/Flickr retrieval
papers call Recall@K); recall@k — the share of all positives in the top k; mrr — 1 / rank of the first
positive; top1 — hit@1. Tied scores are ordered at random and every metric is its expectation over those
orders, so a model that scores every candidate the same gets exactly chance, whatever the candidates' order.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np


def _tie_groups(scores: np.ndarray, positive: np.ndarray) -> list[tuple[int, int, int]]:
    """The groups of equal scores that hold a positive, best first: (items ranked above the group, group size,
    positives in it)."""
    scores = np.asarray(scores, dtype=np.float64)
    values, pos = np.unique(scores[np.asarray(positive, dtype=bool)], return_counts=True)
    if len(values) <= 8:  # the usual few positives: counting beats sorting the whole list
        above = [int((scores > v).sum()) for v in values]
        size = [int((scores == v).sum()) for v in values]
    else:
        ordered = np.sort(scores)
        upto = np.searchsorted(ordered, values, side="right")
        above = (len(scores) - upto).tolist()
        size = (upto - np.searchsorted(ordered, values, side="left")).tolist()
    return list(zip(above, size, pos.tolist()))[::-1]


def _miss_probability(size: int, pos: int, slots: int) -> float:
    """The chance that none of `pos` positives, placed at random among `size` places, lands in the first `slots`."""
    probability = 1.0
    for i in range(pos):
        probability *= max(size - slots - i, 0) / (size - i)
        if probability == 0.0:
            break
    return probability


def _expected_reciprocal(above: int, size: int, pos: int) -> float:
    """E[1 / (rank of the first positive + 1)] when `pos` positives lie at random among `size` tied places."""
    if size == pos:
        return 1.0 / (above + 1)
    first = np.arange(size - pos + 1)  # where the first positive can sit in the group
    # P(first = x) = C(size-1-x, pos-1) / C(size, pos), built as a running product
    ratio = np.ones(len(first))
    ratio[1:] = (size - pos - first[:-1]) / (size - 1 - first[:-1])
    probability = pos / size * np.cumprod(ratio)
    return float((probability / (above + first + 1)).sum())


def query_metrics(scores: np.ndarray, positive: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """hit@k, recall@k for each k, mrr and top1 of one query's scored candidates (ties: expected values)."""
    return dict(_metrics(tuple(_tie_groups(scores, positive)), tuple(ks)))


def chance_metrics(n_candidates: int, n_positives: int, ks: Sequence[int]) -> dict[str, float]:
    """The metrics of a random ranking: every candidate tied."""
    return dict(_metrics(((0, n_candidates, n_positives),), tuple(ks)))


@lru_cache(maxsize=4096)  # many queries share a ranking shape: a clean first place, or the same chance level
def _metrics(groups: tuple[tuple[int, int, int], ...], ks: tuple[int, ...]) -> dict[str, float]:
    n_pos = sum(p for _, _, p in groups)
    if n_pos == 0:
        raise ValueError("a query needs at least one positive")
    above, size, pos = groups[0]  # the best group with a positive: only negatives rank above it

    def hit(k: int) -> float:
        return 1.0 - _miss_probability(size, pos, min(max(k - above, 0), size))

    out = {"top1": hit(1), "mrr": _expected_reciprocal(above, size, pos)}
    for k in ks:
        out[f"hit@{k}"] = hit(k)
        out[f"recall@{k}"] = sum(p * min(max((k - a) / g, 0.0), 1.0) for a, g, p in groups) / n_pos
    return out


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average per-query metric dicts key by key."""
    if not rows:
        return {}
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
