"""Ranking metrics with separate names: hit@k, recall@k, mrr, top-1 accuracy.

hit@k — some positive is in the top k (what UniIR and MMEB call recall); recall@k — the share of
all positives in the top k; mrr — 1 / rank of the first positive; top1 — hit@1. Ties are broken
against the positives, so a model that scores every candidate the same gets chance, not 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def positive_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives, best first: the i-th best positive sits after the i positives
    ahead of it and after every negative scoring at least as high (tied positives take distinct ranks)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    pos_scores = np.sort(scores[positive])[::-1]
    neg_scores = np.sort(scores[~positive])
    ahead_neg = len(neg_scores) - np.searchsorted(neg_scores, pos_scores, side="left")
    return ahead_neg + np.arange(len(pos_scores))


def query_metrics(scores: np.ndarray, positive: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """hit@k, recall@k for each k, mrr and top1 of one query's scored candidates."""
    ranks = positive_ranks(scores, positive)
    if len(ranks) == 0:
        raise ValueError("a query needs at least one positive")
    first = int(ranks.min())
    out = {"top1": float(first == 0), "mrr": 1.0 / (first + 1)}
    for k in ks:
        out[f"hit@{k}"] = float(first < k)
        out[f"recall@{k}"] = float((ranks < k).sum() / len(ranks))
    return out


def chance_top1(n_candidates: int, n_positives: int) -> float:
    """The top-1 accuracy of a random ranking."""
    return n_positives / n_candidates


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average per-query metric dicts key by key."""
    if not rows:
        return {}
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
