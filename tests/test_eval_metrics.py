"""The ranking metrics of `retrieval eval` (evaluation/metrics.py) against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import mean_metrics, query_metrics

# ---------------------------------------------------------------------------------------------- 1. metrics


def test_metrics_one_positive_by_hand():
    scores = np.array([0.2, 0.9, 0.5, 0.7, 0.1])
    m = query_metrics(scores, np.array([0, 0, 1, 0, 0], bool), ks=(1, 2, 3, 5))
    # 0.5 is third after 0.9 and 0.7 → rank 3
    assert m == {"top1": 0.0, "mrr": pytest.approx(1 / 3), "hit@1": 0.0, "recall@1": 0.0, "hit@2": 0.0,
                 "recall@2": 0.0, "hit@3": 1.0, "recall@3": 1.0, "hit@5": 1.0, "recall@5": 1.0}
    best = query_metrics(scores, np.array([0, 1, 0, 0, 0], bool), ks=(1,))
    assert best == {"top1": 1.0, "mrr": 1.0, "hit@1": 1.0, "recall@1": 1.0}
    worst = query_metrics(scores, np.array([0, 0, 0, 0, 1], bool), ks=(4, 5))
    assert worst["mrr"] == pytest.approx(0.2) and worst["hit@4"] == 0.0 and worst["hit@5"] == 1.0


def test_metrics_several_positives_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    positive = np.array([0, 1, 0, 1], bool)
    m = query_metrics(scores, positive, ks=(1, 2, 3, 4))
    assert m["top1"] == 0.0
    assert m["mrr"] == pytest.approx(0.5)
    assert (m["hit@1"], m["hit@2"], m["hit@3"], m["hit@4"]) == (0.0, 1.0, 1.0, 1.0)
    assert (m["recall@1"], m["recall@2"], m["recall@3"], m["recall@4"]) == (0.0, 0.5, 0.5, 1.0)
    # three positives among six, at ranks 0, 2 and 5 (order: 0.95, 0.7, 0.6, 0.5, 0.3, 0.2)
    m = query_metrics(np.array([0.3, 0.95, 0.6, 0.7, 0.2, 0.5]), np.array([0, 1, 1, 0, 1, 0], bool),
                      ks=(1, 2, 3, 5, 6))
    assert m["top1"] == 1.0 and m["mrr"] == 1.0
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@2"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3) and m["recall@5"] == pytest.approx(2 / 3)
    assert m["recall@6"] == 1.0


def test_metrics_ties_are_expected_values_over_random_orders():
    # a positive tied with a negative is first half the time
    m = query_metrics(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0], bool), ks=(1, 2))
    assert m == pytest.approx({"top1": 0.5, "mrr": 0.75, "hit@1": 0.5, "recall@1": 0.5, "hit@2": 1.0,
                               "recall@2": 1.0})
    # order in the array does not matter
    assert query_metrics(np.array([0.5, 0.5, 0.1]), np.array([0, 1, 0], bool), ks=(1, 2)) == m
    # all scores equal: one positive among n scores exactly chance
    for n in (2, 5, 10):
        positive = np.zeros(n, bool)
        positive[n // 2] = True
        m = query_metrics(np.full(n, 0.3), positive, ks=(1, n - 1, n))
        assert m["top1"] == pytest.approx(1 / n), n
        assert m["mrr"] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)
        assert m[f"hit@{n - 1}"] == pytest.approx((n - 1) / n) and m[f"hit@{n}"] == 1.0


def test_tied_positives_by_hand():
    m = query_metrics(np.array([0.5, 0.5, 0.1]), np.array([1, 1, 0], bool), ks=(1, 2))
    assert (m["top1"], m["mrr"], m["recall@1"], m["recall@2"]) == (1.0, 1.0, 0.5, 1.0)
    # two positives and a negative all tied: the negative is first a third of the time
    m = query_metrics(np.array([0.5, 0.5, 0.5]), np.array([1, 1, 0], bool), ks=(1, 2, 3))
    assert m == pytest.approx({"top1": 2 / 3, "mrr": 2 / 3 + 1 / 3 / 2, "hit@1": 2 / 3, "recall@1": 1 / 3,
                               "hit@2": 1.0, "recall@2": 2 / 3, "hit@3": 1.0, "recall@3": 1.0})


@pytest.mark.parametrize("seed", range(6))
def test_ties_match_every_order_enumerated(seed):
    """Against brute force: the mean of each metric over every order of the tied items."""
    import itertools

    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=7).astype(float)  # few values: many ties
    positive = rng.random(7) < 0.4
    positive[rng.integers(7)] = True
    ks = (1, 2, 3, 5)
    totals, count = {}, 0
    for order in itertools.permutations(range(7)):  # a tie-break order: earlier in `order` ranks first
        tie_rank = np.empty(7)
        tie_rank[list(order)] = np.arange(7)
        ranked = np.lexsort((tie_rank, -scores))
        ranks = np.flatnonzero(positive[ranked])
        one = {"top1": float(ranks[0] == 0), "mrr": 1 / (ranks[0] + 1)}
        for k in ks:
            one[f"hit@{k}"] = float(ranks[0] < k)
            one[f"recall@{k}"] = float((ranks < k).mean())
        totals = {key: totals.get(key, 0.0) + value for key, value in one.items()}
        count += 1
    assert query_metrics(scores, positive, ks) == pytest.approx({key: v / count for key, v in totals.items()})


def test_metrics_need_a_positive():
    with pytest.raises(ValueError):
        query_metrics(np.array([0.1, 0.2]), np.array([0, 0], bool), ks=(1,))


def test_mean_and_chance():
    assert mean_metrics([]) == {}
    rows = [{"top1": 1.0, "mrr": 1.0}, {"top1": 0.0, "mrr": 0.5}, {"top1": 0.0, "mrr": 0.25}]
    assert mean_metrics(rows) == {"top1": pytest.approx(1 / 3), "mrr": pytest.approx(1.75 / 3)}
    # a random ranking's expected top1 is the chance level
    rng = np.random.default_rng(0)
    positive = np.zeros(8, bool)
    positive[:2] = True
    top1 = np.mean([query_metrics(rng.random(8), positive, (1,))["top1"] for _ in range(4000)])
    assert top1 == pytest.approx(2 / 8, abs=0.03)
    # and exactly what every candidate scoring the same gets
    assert query_metrics(np.zeros(8), positive, (1,))["top1"] == pytest.approx(2 / 8)


def test_many_positives_without_ties_match_plain_ranks():
    """Beyond a few distinct positive scores the groups come from a sort: the same as ranking by hand."""
    rng = np.random.default_rng(3)
    scores = rng.random(50)
    positive = np.zeros(50, bool)
    positive[rng.choice(50, 20, replace=False)] = True
    ranks = np.flatnonzero(positive[np.argsort(-scores)])
    m = query_metrics(scores, positive, ks=(1, 5, 10, 30))
    assert m["mrr"] == pytest.approx(1 / (ranks[0] + 1))
    for k in (1, 5, 10, 30):
        assert m[f"hit@{k}"] == float(ranks[0] < k)
        assert m[f"recall@{k}"] == pytest.approx((ranks < k).mean())
