"""`--index-key auto` by measurement (indexers/select.py): the candidates the budget allows, built on a sample,
tuned, timed, and the winner by goal. The choice among measured trials is checked on constructed trials; the
measuring on real FAISS indexes checks what it records, never how fast anything was."""

from __future__ import annotations

import json

import numpy as np
import pytest

import indexers.choose as choose
import indexers.select as select
from indexers.choose import candidates, parse_memory
from indexers.errors import IndexerError
from indexers.select import Trial, pick, sample_key, select_index

faiss = pytest.importorskip("faiss")


def trial(key, recall, qps, build=10.0, size=100):
    return Trial(key=key, sample_key=key, params="nprobe=8", recall=recall, qps=qps, build_seconds=build, bytes=size)


TRIALS = [trial("fast-but-short", 0.93, 9_000, 5, 50), trial("steady", 0.96, 4_000, 30, 300),
          trial("quick", 0.95, 2_000, 8, 200), trial("small", 0.97, 1_000, 60, 80)]


@pytest.mark.parametrize("goal, winner", [("latency", "steady"), ("memory", "small"), ("build", "quick")])
def test_pick_takes_the_best_by_goal_among_those_reaching_the_target(goal, winner):
    best, why = pick(TRIALS, 0.95, goal)
    assert best.key == winner  # never "fast-but-short": it misses the target recall
    assert why.startswith(f"{winner}: ") and "3 candidates reaching 0.95" in why and "1 more did not" in why


def test_pick_falls_back_to_the_best_recall_and_refuses_unknown_goals():
    best, why = pick(TRIALS, 0.99)
    assert best.key == "small" and "no candidate reached recall 0.99" in why
    with pytest.raises(IndexerError, match="--optimize must be one of latency, memory, build"):
        pick(TRIALS, 0.9, "speed")


def test_candidates_by_size_and_budget():
    budget = parse_memory("16GB")
    assert [c.key for c in candidates(1_000, 64, budget)] == ["Flat"]
    mid = [c.key for c in candidates(100_000, 256, budget)]
    assert mid == ["HNSW32", "HNSW32_SQ8", "IVF1024,SQ8", "IVF1024_HNSW32,SQ8", "IVF1024,PQ128x4fs,Refine(SQ8)"]
    big = [c.key for c in candidates(1_000_000, 256, budget)]
    assert not any(k.startswith("HNSW") for k in big) and big[0] == "IVF4096,SQ8"  # HNSW would build too long
    tight = [c.key for c in candidates(1_000_000, 256, parse_memory("200MB"))]
    assert tight == ["IVF4096,PQ128x4fs"]
    assert sample_key("IVF4096_HNSW32,SQ8", 100_000) == "IVF1024_HNSW32,SQ8"
    assert sample_key("IVF4096,PQ128x4fs,Refine(SQ8)", 20_000) == "IVF512,PQ128x4fs,Refine(SQ8)"
    assert sample_key("HNSW32_SQ8", 100_000) == "HNSW32_SQ8"


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(select, "MIN_SECONDS", 0.0)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim))
    x = centres[rng.integers(64, size=n)] + 0.4 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.slow  # six candidate indexes built and tuned on 60k vectors
@pytest.mark.parametrize("goal", ["latency", "memory"])
def test_select_measures_every_candidate_and_picks_by_its_own_measurements(quick, goal):
    n, dim = 60_000, 32
    sample = clustered(n, dim, 1)
    selection = select_index(sample, n, dim, parse_memory("4GB"), 0.9, goal=goal)
    keys = [t.key for t in selection.trials]
    assert keys == [c.key for c in candidates(n, dim, parse_memory("4GB"))]
    for t in selection.trials:
        assert 0 <= t.recall <= 1 and t.qps > 0 and t.build_seconds > 0 and t.bytes > 0
    reaching = [t for t in selection.trials if t.recall - 1.645 * t.recall_error >= 0.9]
    assert reaching, selection.trials
    want = (max(reaching, key=lambda t: t.qps) if goal == "latency"
            else min(reaching, key=lambda t: (t.bytes, -t.qps)))  # of equal sizes, the faster
    assert selection.choice.key == want.key and selection.choice.reason.startswith(f"{want.key}: ")
    assert all(t.recall_error > 0 for t in selection.trials)


def test_index_json_records_what_auto_measured(shapes_store, tmp_path, monkeypatch, quick):
    """With the exact-search limit lowered, a 300-row store gets the measured choice: index.json names the
    candidates tried, and the reason names the winner."""
    from retrieval.indexing import build_index_folder

    monkeypatch.setattr(choose, "EXACT_MAX", 100)
    info = build_index_folder(shapes_store, tmp_path / "idx", memory_budget="1GB", target_recall=0.9,
                              progress=False)
    recorded = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert recorded["candidates"] == info["candidates"] and len(recorded["candidates"]) >= 3
    keys = [c["key"] for c in recorded["candidates"]]
    assert recorded["index_key"] in keys and recorded["choice"].startswith(f"{recorded['index_key']}: ")
    assert {"key", "sample_key", "params", "recall", "qps", "build_seconds", "bytes"} <= set(recorded["candidates"][0])
    assert recorded["ann_recall@10"] >= 0.0 and recorded["plain_recall@10"] <= 1.0


def test_a_candidate_faiss_refuses_on_the_sample_is_recorded_and_skipped(quick):
    """15 vectors, a budget exact search does not fit: PQ fast-scan cannot train on 14 points, IVF-SQ8 can."""
    sample = clustered(15, 32, 2)
    selection = select_index(sample, 15, 32, 1500, 0.5)
    failed = [t for t in selection.trials if t.error]
    assert failed and all("PQ" in t.key and t.qps == 0 for t in failed)
    assert "SQ8" in selection.choice.key and not selection.choice.key.startswith("Flat")


def test_a_recall_measured_on_few_queries_must_clear_the_target_by_its_confidence_margin():
    noisy = Trial("noisy-but-fast", "k", "", 0.955, 50_000, 5.0, 100, recall_error=0.01)  # 0.955 - 1.645·0.01 < 0.95
    sure = Trial("sure", "k", "", 0.953, 3_000, 5.0, 100, recall_error=0.001)
    assert pick([noisy, sure], 0.95)[0].key == "sure"
    assert pick([noisy, sure], 0.93)[0].key == "noisy-but-fast"
