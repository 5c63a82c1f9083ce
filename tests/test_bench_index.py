"""`retrieval bench index` at toy sizes: the report's shape and sanity, the synthetic data, the store path.

No timed assertions: speed is what the benchmark prints, never what a test asserts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import indexers.select as select
from evaluation.bench.index import (
    DATABASE,
    QUERIES,
    Synthetic,
    bench_index,
    candidate_keys,
    report_lines,
    synthetic_vectors,
)
from indexers.choose import choose_index, parse_memory
from retrieval.errors import RetrievalError

pytest.importorskip("faiss")

N, DIM = 20_000, 32


@pytest.fixture(autouse=True, scope="module")
def quick_timing():
    """One timed run per round is enough here: these tests check values, never speed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select, "MIN_SECONDS", 0.0)
        yield


@pytest.fixture(scope="module")
def report(quick_timing):
    return bench_index(n=N, dim=DIM, queries=100, memory_budget="1GB", compare_hnsw=True, progress=False)


@pytest.mark.slow
def test_report_has_every_candidate_with_sane_values(report):
    auto = choose_index(N, DIM, parse_memory("1GB")).key
    assert report["auto"]["key"] == auto and report["auto"]["reason"]
    keys = [c["key"] for c in report["candidates"]]
    assert keys[:-1] == candidate_keys(N, DIM, auto) and keys[0] == "Flat" and keys[-1] == "HNSW32"
    assert any(k.startswith("HNSW") for k in keys) and any(k.endswith(",Flat") and "IVF" in k for k in keys)
    assert any("PQ" in k and "Refine" in k for k in keys)
    assert report["skipped"] == []
    assert (report["n"], report["dim"], report["queries"], report["k"]) == (N, DIM, 100, 10)
    for c in report["candidates"]:
        assert 0.0 <= c["ann_recall@10"] <= 1.0 and 0.0 <= c["tune_recall"] <= 1.0
        assert c["qps"] > 0 and c["qps_ratio"] > 0
        assert set(c["build_seconds"]) >= {"train", "add", "tune", "total"}
        assert all(s >= 0 for s in c["build_seconds"].values())
        assert c["bytes_per_vector"] > 0
        assert c["auto"] == (c["key"] == auto and not c["hnsw_baseline"])
    flat = report["candidates"][0]
    assert flat["ann_recall@10"] == 1.0 and flat["qps_ratio"] == 1.0 and flat["search_params"] == ""
    # float32 vectors plus the id map's ids, and a little header
    assert 4 * DIM <= flat["bytes_per_vector"] <= 4 * DIM + 32
    pq = next(c for c in report["candidates"] if "PQ" in c["key"])
    assert pq["bytes_per_vector"] < flat["bytes_per_vector"]
    json.dumps(report)  # JSON-able as it is


@pytest.mark.slow
def test_report_lines_show_the_table_and_the_bar(report):
    lines = report_lines(report)
    text = "\n".join(lines)
    for c in report["candidates"]:
        assert c["key"] in text
    assert "recall@10" in text and "× exact" in text and "bytes/vec" in text
    assert f"{report['auto']['key']} (auto)" in text
    baseline = next(c for c in report["candidates"] if c["hnsw_baseline"])  # --compare-hnsw
    auto = next(c for c in report["candidates"] if c["auto"])
    assert baseline["key"] == "HNSW32" and baseline["target_recall"] == auto["ann_recall@10"]
    assert "HNSW32 (at auto's recall)" in text
    bar = lines[-1]
    assert bar.startswith("bar (") and ("holds" in bar or "fails" in bar)
    assert f"{auto['qps'] / baseline['qps']:.2f}× HNSW32" in bar
    assert "this run is 20,000 × 32" in bar  # not the bar's size: said so


def test_synthetic_vectors_are_unit_norm_and_low_rank():
    params = Synthetic()
    x = synthetic_vectors(5_000, 256, seed=3, params=params)
    assert x.shape == (5_000, 256) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    energy = np.linalg.svd(x, compute_uv=False) ** 2
    share = energy[:params.rank].sum() / energy.sum()
    assert 0.7 < share < 0.95, share  # mostly low rank, with real noise on top
    assert energy[:8].sum() / energy.sum() > 8 / 256 * 4  # a decaying spectrum, far from isotropic


def test_synthetic_vectors_are_deterministic_and_queries_are_held_out():
    a = synthetic_vectors(70_000, 16, seed=5)  # more than one generation chunk
    np.testing.assert_array_equal(a, synthetic_vectors(70_000, 16, seed=5))
    assert not np.array_equal(a[:100], synthetic_vectors(100, 16, seed=6))
    q = synthetic_vectors(50, 16, seed=5, stream=QUERIES)
    # no query is a database row (whole rows: single float32 coordinates can coincide by chance)
    assert DATABASE != QUERIES and not (q[:, None, :] == a[None, :, :]).all(-1).any()
    # the same subspace for both streams: queries lie where the data lies
    base = np.linalg.svd(a[:2_000], full_matrices=False)[2][:8]
    assert np.linalg.norm(q @ base.T, axis=1).mean() > 0.5


def test_keys_override_the_candidates_and_auto_stands_for_the_choice():
    out = bench_index(n=3_000, dim=16, keys=["auto", "IVF16,Flat"], queries=20, progress=False)
    assert [c["key"] for c in out["candidates"]] == ["Flat", "IVF16,Flat"]  # auto is Flat at this size
    assert out["candidates"][0]["auto"]


def test_candidates_over_the_memory_budget_are_skipped_with_a_reason():
    out = bench_index(n=3_000, dim=16, keys=["HNSW32", "IVF16,Flat"], queries=20, memory_budget="300KB",
                      progress=False)
    assert [c["key"] for c in out["candidates"]] == ["Flat", "IVF16,Flat"]  # Flat: always, as the baseline
    assert [s["key"] for s in out["skipped"]] == ["HNSW32"]
    assert "memory budget" in out["skipped"][0]["reason"]
    assert any(line.startswith("skipped HNSW32") for line in report_lines(out))


def test_unknown_key_is_a_retrieval_error():
    with pytest.raises(RetrievalError, match="FAISS cannot build index key 'NotAnIndex42'"):
        bench_index(n=2_000, dim=16, keys=["NotAnIndex42"], queries=10, progress=False)


def test_bench_on_a_real_store(shapes_store):
    from retrieval.store import EmbeddingStore

    store = EmbeddingStore(shapes_store)
    out = bench_index(store=shapes_store, queries=20, progress=False)
    assert out["data"]["source"] == "store" and out["data"]["count"] == store.count
    assert out["n"] == store.count - 20 and out["dim"] == store.dim and out["queries"] == 20
    keys = [c["key"] for c in out["candidates"]]
    assert keys[0] == "Flat" and len(keys) >= 3
    assert out["candidates"][0]["ann_recall@10"] == 1.0
    for c in out["candidates"]:
        assert 0.0 <= c["ann_recall@10"] <= 1.0 and c["qps"] > 0
    assert any("store" in line for line in report_lines(out))
