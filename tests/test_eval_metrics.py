"""The ranking metrics of `retrieval eval` (evaluation/metrics.py) against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import chance_top1, mean_metrics, positive_ranks, query_metrics

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
    assert list(positive_ranks(scores, positive)) == [1, 3]
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


def test_metrics_ties_go_against_positives():
    # a positive tied with a negative ranks below it
    m = query_metrics(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0], bool), ks=(1, 2))
    assert (m["top1"], m["mrr"], m["hit@1"], m["hit@2"]) == (0.0, 0.5, 0.0, 1.0)
    # order in the array does not matter
    m2 = query_metrics(np.array([0.5, 0.5, 0.1]), np.array([0, 1, 0], bool), ks=(1, 2))
    assert m2 == m
    # all scores equal: one positive among n ranks last, not first
    for n in (2, 5, 10):
        positive = np.zeros(n, bool)
        positive[n // 2] = True
        m = query_metrics(np.full(n, 0.3), positive, ks=(1, n - 1, n))
        assert m["top1"] == 0.0, n
        assert m["mrr"] == pytest.approx(1 / n)
        assert m[f"hit@{n - 1}"] == 0.0 and m[f"hit@{n}"] == 1.0


def test_metrics_tied_positives_do_not_push_each_other_down():
    m = query_metrics(np.array([0.5, 0.5, 0.1]), np.array([1, 1, 0], bool), ks=(1, 2))
    assert (m["top1"], m["mrr"], m["hit@1"]) == (1.0, 1.0, 1.0)
    assert m["recall@2"] == 1.0
    # two tied positives behind a tied negative: the first of them is second
    m = query_metrics(np.array([0.5, 0.5, 0.5]), np.array([1, 1, 0], bool), ks=(1, 2, 3))
    assert (m["top1"], m["mrr"], m["hit@2"], m["recall@3"]) == (0.0, 0.5, 1.0, 1.0)


def test_recall_with_tied_positives_is_bounded_by_k():
    # only one item fits in the top 1, so at most half of two positives can be found there
    m = query_metrics(np.array([0.5, 0.5, 0.1]), np.array([1, 1, 0], bool), ks=(1, 2))
    assert m["recall@1"] == 0.5
    # a tied negative goes first, then the two positives at ranks 1 and 2
    m = query_metrics(np.array([0.5, 0.5, 0.5]), np.array([1, 1, 0], bool), ks=(2,))
    assert m["recall@2"] == 0.5


def test_metrics_need_a_positive():
    with pytest.raises(ValueError):
        query_metrics(np.array([0.1, 0.2]), np.array([0, 0], bool), ks=(1,))


def test_chance_and_mean():
    assert chance_top1(10, 1) == pytest.approx(0.1)
    assert chance_top1(60, 2) == pytest.approx(1 / 30)
    assert chance_top1(4, 4) == 1.0
    assert mean_metrics([]) == {}
    rows = [{"top1": 1.0, "mrr": 1.0}, {"top1": 0.0, "mrr": 0.5}, {"top1": 0.0, "mrr": 0.25}]
    assert mean_metrics(rows) == {"top1": pytest.approx(1 / 3), "mrr": pytest.approx(1.75 / 3)}
    # a random ranking's expected top1 is the chance level
    rng = np.random.default_rng(0)
    positive = np.zeros(8, bool)
    positive[:2] = True
    top1 = np.mean([query_metrics(rng.random(8), positive, (1,))["top1"] for _ in range(4000)])
    assert top1 == pytest.approx(chance_top1(8, 2), abs=0.03)
