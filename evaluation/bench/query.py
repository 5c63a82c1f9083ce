"""`retrieval bench query`: warm query latency (p50/p95) for image, text and composed queries on an index.

Each query is timed in two stages that together are exactly `SearchIndex.search`: encode (`embed_query`:
read and decode the image, prepare, embed) and search (`search_vectors`: FAISS, plus `hits`: the store
lookups). Queries are the store's own images and texts, sampled with a seed; warm-up queries run first.
Load averages before and after are recorded: on a busy machine multi-threaded single queries wait on
the scheduler, so compare with `threads=1`.
The bar (DESIGN.md): a warm composed query (tiny model, 100k index, CPU) ≤ 30 ms at the median.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.bench.common import format_table, thread_count

BAR_MS = 30.0
BAR_MIN_COUNT = 100_000
KINDS = ("image", "text", "composed")
STAGES = ("encode", "search", "total")


def sample_queries(metadata, n: int, seed: int = 0) -> dict[str, list[tuple[str | None, str | None]]]:
    """n (image, text) queries of each kind from the store's rows: images, texts, and an image with a text."""
    from retrieval.errors import RetrievalError

    images = np.asarray([x for x in metadata["image"].to_pylist() if x], dtype=object)
    texts = np.asarray([x for x in metadata["text"].to_pylist() if x and x.strip()], dtype=object)
    if not len(images) or not len(texts):
        raise RetrievalError("the query bench needs a store with both images and texts")
    rng = np.random.default_rng(seed)
    pick_i = images[rng.integers(len(images), size=n)].tolist()
    pick_t = texts[rng.integers(len(texts), size=n)].tolist()
    return {"image": [(i, None) for i in pick_i], "text": [(None, t) for t in pick_t],
            "composed": list(zip(pick_i, rng.permutation(np.asarray(pick_t, dtype=object)).tolist()))}


def time_query(index, image: str | None, text: str | None, k: int) -> tuple[float, float, int]:
    """(encode seconds, search seconds, hits) for one query, run as `SearchIndex.search` runs it."""
    t0 = time.perf_counter()
    vector = index.embed_query(image, text)
    t1 = time.perf_counter()
    scores, rows = index.search_vectors(vector, k)
    hits = index.hits(scores[0], rows[0])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, len(hits)


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean())}


def bench_query(index: str | os.PathLike, n: int = 200, k: int = 10, warmup: int = 20, seed: int = 0,
                device: str = "auto", threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Warm latency of image, text and composed queries on an index folder, split into encode and search.

    `threads` sets both torch's and FAISS's thread count for the run (default: torch's current count).
    """
    import faiss
    import torch
    from tqdm import tqdm

    from retrieval.errors import RetrievalError
    from retrieval.search import check_k, open_index

    check_k(k)
    if n <= 0 or warmup < 0:
        raise RetrievalError("--n must be positive and --warmup not negative")
    path = Path(index)
    if not path.is_dir():
        raise RetrievalError(f"index folder not found: {path}")
    with thread_count(threads):
        load_before = os.getloadavg()[0]
        with_open = time.perf_counter()
        idx = open_index(path, device=device)
        queries = sample_queries(idx.metadata, n + warmup, seed)
        open_seconds = time.perf_counter() - with_open
        kinds: dict[str, Any] = {}
        for kind in KINDS:
            for image, text in queries[kind][:warmup]:
                time_query(idx, image, text, k)
            enc, sea, tot, found = [], [], [], []
            for image, text in tqdm(queries[kind][warmup:], desc=f"{kind} queries", unit="query",
                                    disable=not progress, dynamic_ncols=True):
                e, s, h = time_query(idx, image, text, k)
                enc.append(e)
                sea.append(s)
                tot.append(e + s)
                found.append(h)
            kinds[kind] = {"encode": _stats(enc), "search": _stats(sea), "total": _stats(tot),
                           "mean_hits": float(np.mean(found))}
        torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    composed = kinds["composed"]["total"]["p50_ms"]
    info = idx.info
    applies = info["count"] >= BAR_MIN_COUNT and idx.encoder.device == "cpu"
    return {
        "benchmark": "query",
        "index": str(path),
        "model": idx.encoder.name,
        "dim": info["dim"],
        "count": info["count"],
        "factory": info.get("factory"),
        "search_params": info.get("search_params"),
        "device": idx.encoder.device,
        "torch_threads": torch_threads,
        "faiss_threads": faiss_threads,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "n": n,
        "k": k,
        "warmup": warmup,
        "seed": seed,
        "open_seconds": open_seconds,
        "kinds": kinds,
        "bar": {"max_composed_p50_ms": BAR_MS, "composed_p50_ms": composed, "holds": composed <= BAR_MS,
                "applies": applies,
                "note": "" if applies else f"the bar is for a ≥ {BAR_MIN_COUNT}-item index on the CPU"},
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """The printed form of a `bench_query` report: a latency table per query kind and stage, and the bar."""
    lines = [f"query bench: {report['index']} — {report['model']} (dim {report['dim']}), {report['count']} items, "
             f"{report['factory']} {report['search_params'] or ''}".rstrip(),
             f"{report['n']} warm queries per kind (after {report['warmup']} warm-up), k={report['k']}, "
             f"device {report['device']}, {report['torch_threads']} torch / {report['faiss_threads']} faiss threads, "
             f"{report['cpu_count']} CPUs (1-min load average {report['load_avg_1m'][0]:.1f} before, "
             f"{report['load_avg_1m'][1]:.1f} after), opened in {report['open_seconds']:.2f} s", ""]
    rows = [["query", "stage", "p50 ms", "p95 ms", "mean ms", "share of total"]]
    for kind, stats in report["kinds"].items():
        total_mean = stats["total"]["mean_ms"]
        for stage in STAGES:
            s = stats[stage]
            share = s["mean_ms"] / total_mean if total_mean else 0.0
            rows.append([kind if stage == "encode" else "", stage, f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}",
                         f"{s['mean_ms']:.2f}", f"{share:.2f}"])
    lines.append(format_table(rows))
    bar = report["bar"]
    verdict = ("holds" if bar["holds"] else "MISSED") + ("" if bar["applies"] else f" — n/a: {bar['note']}")
    p50, limit = bar["composed_p50_ms"], bar["max_composed_p50_ms"]
    lines += ["", f"composed p50 = {p50:.2f} ms = {p50 / limit:.2f} × the bar (≤ {limit:.0f} ms): {verdict}"]
    return lines
