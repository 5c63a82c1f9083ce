"""The speed benchmarks (`retrieval bench encode|query`) at tiny sizes: report fields, consistency, errors.

Speed itself is never asserted here (DESIGN.md, "Bars"): only that the numbers are present, positive and
add up, that the encode job really wrote a complete store, and that bad arguments get a RetrievalError.
"""

from __future__ import annotations

import json
import math

import duckdb
import pytest
import torch

from evaluation.bench import encode as bench_encode_module
from evaluation.bench.encode import batch_sizes, bench_encode
from evaluation.bench.encode import report_lines as encode_lines
from evaluation.bench.query import KINDS, STAGES, bench_query, sample_queries
from evaluation.bench.query import report_lines as query_lines
from retrieval.errors import RetrievalError
from retrieval.indexing import build_index_folder
from retrieval.search import open_index
from retrieval.store import EmbeddingStore

N = 64


@pytest.fixture(scope="module")
def encode_report(tmp_path_factory) -> dict:
    """One tiny encode bench with a loader worker, its data kept so the store can be read back."""
    work = tmp_path_factory.mktemp("bench-encode")
    return bench_encode("test-tiny", n=N, batch_size=16, workers=1, part_size=40, work_dir=work, progress=False)


@pytest.fixture(scope="module")
def index_dir(shapes_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-index") / "idx"
    build_index_folder(shapes_store, out, progress=False)
    return out


@pytest.fixture(scope="module")
def query_report(index_dir) -> dict:
    return bench_query(index_dir, n=12, k=5, warmup=2, progress=False)


# ------------------------------------------------------------------------------------------------ encode


def test_encode_report_is_json_and_sane(encode_report):
    r = json.loads(json.dumps(encode_report))
    assert r["model"] == "test-tiny" and r["n"] == N and r["batch_size"] == 16 and r["workers"] == 1
    assert r["image_size"] == 16  # the model's config.image_size by default
    assert r["device"] == "cpu" and r["torch_threads"] >= 1
    for side in ("bare", "job"):
        assert r[side]["items"] == N
        assert r[side]["seconds"] > 0 and r[side]["items_per_s"] > 0
        assert math.isclose(r[side]["items_per_s"], N / r[side]["seconds"], rel_tol=1e-9)
    assert math.isclose(r["ratio"], r["job"]["items_per_s"] / r["bare"]["items_per_s"], rel_tol=1e-9)
    assert r["bar"]["min_ratio"] == 0.9 and r["bar"]["holds"] == (r["ratio"] >= 0.9)
    assert r["bare"]["distinct_prepared_items"] == N
    assert len(r["bare"]["passes_items_per_s"]) == 2  # before and after the job; the faster is the reference
    assert math.isclose(r["bare"]["items_per_s"], max(r["bare"]["passes_items_per_s"]), rel_tol=1e-9)
    assert r["prepare"]["items"] == N - 1 and r["prepare"]["items_per_s"] > 0


def test_encode_memory_fields(encode_report):
    mem = encode_report["memory"]
    assert mem["rss_before_job"] > 0 and mem["rss_peak_job"] >= mem["rss_before_job"]
    assert mem["rss_growth_job"] == mem["rss_peak_job"] - mem["rss_before_job"]
    assert max(mem["rss_peak_first_half"], mem["rss_peak_second_half"]) <= mem["rss_peak_job"]
    assert mem["workers_peak_rss"] > 0  # one loader worker ran
    assert mem["store_bytes"] > 0 and mem["vector_bytes"] == N * encode_report["dim"] * 4


def test_encode_job_wrote_a_complete_store(encode_report):
    job = encode_report["job"]
    assert job["encoded"] == N and job["errors"] == 0 and job["store_complete"] and job["store_rows"] == N
    store = EmbeddingStore(job["store"])
    assert store.complete and store.count == N and len(store.manifest["parts"]) == 2  # part_size 40
    (count, rows, ids, dims), = duckdb.sql(f"SELECT count(*), count(DISTINCT row), count(DISTINCT id), "
                                           f"min(len(embedding)) FROM {store.sql_source()}").fetchall()
    assert count == rows == ids == N and dims == encode_report["dim"]


def test_encode_report_lines(encode_report):
    text = "\n".join(encode_lines(encode_report))
    assert "bare forward" in text and "whole job" in text
    assert f"{encode_report['ratio']:.3f}" in text and "bar ≥ 0.90" in text
    assert "peak" in text and "store" in text


def test_bare_forward_follows_the_job_plan():
    assert batch_sizes(100, 16, 40) == [16, 16, 8, 16, 16, 8, 16, 4]
    assert sum(batch_sizes(10_000, 256, 10_000)) == 10_000


def test_encode_bench_cycles_prepared_batches_under_a_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_encode_module, "MAX_PREPARED_BYTES", 1)  # hold a single batch
    r = bench_encode("test-tiny", n=40, batch_size=8, workers=0, image_size=24, progress=False, work_dir=tmp_path)
    assert r["bare"]["distinct_prepared_items"] == 8 and r["bare"]["items"] == 40
    assert r["image_size"] == 24 and r["job"]["store_rows"] == 40
    assert r["memory"]["workers_peak_rss"] is None


def test_encode_bench_restores_torch_threads(tmp_path):
    before = torch.get_num_threads()
    r = bench_encode("test-tiny", n=8, batch_size=4, workers=0, threads=1, progress=False, work_dir=tmp_path)
    assert r["torch_threads"] == 1 and torch.get_num_threads() == before


def test_encode_bench_refuses_a_used_work_dir(tmp_path):
    (tmp_path / "store").mkdir()
    with pytest.raises(RetrievalError, match="not empty"):
        bench_encode("test-tiny", n=8, workers=0, progress=False, work_dir=tmp_path)


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"batch_size": 0}, {"threads": -1}, {"device": "tpu"},
                                    {"model": "no-such-model"}])
def test_encode_bench_bad_arguments(kwargs, tmp_path):
    args = {"model": "test-tiny", "n": 8, "workers": 0, "progress": False, "work_dir": tmp_path} | kwargs
    with pytest.raises(RetrievalError):
        bench_encode(**args)


# ------------------------------------------------------------------------------------------------- query


def test_query_report_is_json_and_sane(query_report, shapes_store):
    r = json.loads(json.dumps(query_report))
    assert r["count"] == EmbeddingStore(shapes_store).count and r["n"] == 12 and r["k"] == 5
    assert set(r["kinds"]) == set(KINDS)
    for kind in KINDS:
        stats = r["kinds"][kind]
        assert stats["mean_hits"] == 5
        for stage in STAGES:
            s = stats[stage]
            assert 0 < s["p50_ms"] <= s["p95_ms"], (kind, stage)
            assert s["mean_ms"] > 0
        # total is encode + search per query, so the means add up exactly
        assert math.isclose(stats["encode"]["mean_ms"] + stats["search"]["mean_ms"], stats["total"]["mean_ms"],
                            rel_tol=1e-9)
        assert stats["total"]["p50_ms"] >= max(stats["encode"]["p50_ms"], stats["search"]["p50_ms"]) * 0.5
    bar = r["bar"]
    assert bar["composed_p50_ms"] == r["kinds"]["composed"]["total"]["p50_ms"]
    assert bar["holds"] == (bar["composed_p50_ms"] <= 30) and bar["applies"] is False  # 300 items, not 100k


def test_query_report_lines(query_report):
    text = "\n".join(query_lines(query_report))
    for word in (*KINDS, *STAGES, "p50 ms", "p95 ms", "composed p50", "n/a"):
        assert word in text


def test_query_samples_are_seeded_store_items(index_dir):
    meta = open_index(index_dir).metadata
    a, b = sample_queries(meta, 10, seed=3), sample_queries(meta, 10, seed=3)
    assert a == b and a != sample_queries(meta, 10, seed=4)
    images, texts = set(meta["image"].to_pylist()), set(meta["text"].to_pylist())
    assert all(i in images and t is None for i, t in a["image"])
    assert all(i is None and t in texts for i, t in a["text"])
    assert all(i in images and t in texts for i, t in a["composed"])


def test_query_bench_missing_index(tmp_path):
    with pytest.raises(RetrievalError, match="not found"):
        bench_query(tmp_path / "no-such-index", n=2, progress=False)
    with pytest.raises(RetrievalError, match="not an index folder"):
        bench_query(tmp_path, n=2, progress=False)  # exists, but holds no index.json


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"n": 0}, {"warmup": -1}, {"threads": 0}])
def test_query_bench_bad_arguments(kwargs, index_dir):
    with pytest.raises(RetrievalError):
        bench_query(index_dir, **({"n": 2, "progress": False} | kwargs))


def test_random_init_is_the_seeded_initial_model_with_a_stand_in_tokenizer(tmp_path):
    """`bench encode --random-init`: a full-size model is timed without its weights; the folder holds exactly the
    registered config's seeded initial weights, under the model's own special ids, and embeds."""
    from evaluation.bench.encode import random_init_checkpoint
    from retrieval.encoders.registry import get_config, initial_model, load_encoder

    assert random_init_checkpoint("test-tiny", tmp_path / "unused") == "test-tiny"  # runs without a checkpoint
    encoder = load_encoder(random_init_checkpoint("sparc-tiny", tmp_path / "sparc"), device="cpu")
    initial = initial_model(get_config("sparc-tiny")).state_dict()
    assert all(torch.equal(value, initial[key]) for key, value in encoder.model.state_dict().items())
    assert encoder.tokenizer.ids == encoder.model.config.special_ids
    assert encoder.encode(texts=["a red circle"]).shape == (1, encoder.dim)
