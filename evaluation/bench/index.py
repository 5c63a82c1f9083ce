"""`retrieval bench index`: exact search against the automatically chosen index and the other candidates.

Every candidate is built with the production code (`indexers.build.build_index`, tuned to the target recall on
queries sampled from the database, as `retrieval index build` does), then searched side by side in this process
with held-out queries that are not in the database: build seconds, QPS, recall@k against exact search,
serialised bytes per vector, and the QPS ratio to exact (Flat) search. The table's "tuned to" column is the
recall the tuner saw on its in-database queries; "recall@10" is what held-out queries get, every returned id
judged by its exact score (a tie with the exact 10th is right), and "plain" the share of the exact top-10 ids.

Synthetic data is embedding-like: a rank-`rank` latent with a decaying spectrum and clustered points, mapped into
`dim` dimensions, plus isotropic noise, L2-normalised. Isotropic random vectors would make every ANN index look
broken (every neighbour is about as far as every other), and real embeddings are far from isotropic.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from evaluation.bench.common import format_table
from indexers.select import timed_search
from retrieval.errors import RetrievalError, indexer_errors

# the automatic choice at 1M × 256: plain recall@10, QPS against HNSW32 tuned to the same recall, build, size
BAR = {"n": 1_000_000, "dim": 256, "ann_recall": 0.95, "hnsw_ratio": 1.2, "build_seconds": 60.0,
       "bytes_per_vector": 400.0}
CHUNK = 65_536
DATABASE, QUERIES = 0, 1  # random streams of the synthetic generator


@dataclass(frozen=True)
class Synthetic:
    """Embedding-like vectors: clustered rank-`rank` latent, spectrum (1+i)^-decay, plus isotropic noise."""

    rank: int = 64
    decay: float = 0.5  # latent std of direction i ∝ (1 + i)^-decay: variance ∝ 1/(1 + i)
    clusters: int = 1024  # cluster centres in the latent space
    spread: float = 1.0  # within-cluster std relative to the spread of the centres: overlapping clusters
    noise: float = 0.5  # isotropic noise norm relative to the low-rank part (20 % of the energy at 0.5)


def synthetic_vectors(n: int, dim: int, seed: int = 0, stream: int = DATABASE, params: Synthetic = Synthetic(),
                      progress: bool = False) -> np.ndarray:
    """n unit float32 vectors; the same (seed) gives the same subspace and clusters for every stream."""
    from tqdm import tqdm

    rank = min(params.rank, dim)
    rng = np.random.default_rng([seed, 1234])
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)  # orthonormal rows
    scales = ((1.0 + np.arange(rank)) ** -params.decay).astype(np.float32)
    centres = rng.standard_normal((params.clusters, rank), dtype=np.float32) * scales
    signal_energy = (1 + params.spread**2) * float((scales**2).sum())
    noise_std = np.float32(params.noise * np.sqrt(signal_energy / dim))
    out = np.empty((n, dim), np.float32)
    for lo in tqdm(range(0, n, CHUNK), desc="synthetic vectors", unit="chunk", disable=not progress,
                   dynamic_ncols=True):
        m = min(CHUNK, n - lo)
        r = np.random.default_rng([seed, stream, lo // CHUNK])
        z = centres[r.integers(params.clusters, size=m)]
        z += r.standard_normal((m, rank), dtype=np.float32) * (params.spread * scales)
        x = np.matmul(z, basis, out=out[lo:lo + m])
        x += r.standard_normal((m, dim), dtype=np.float32) * noise_std
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return out


def serialized_bytes(index) -> int:
    """Size of faiss.write_index's output, counted without holding a copy."""
    import faiss

    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


def side_by_side(index, exact, queries: np.ndarray, k: int, rounds: int = 3
                 ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """QPS of `index` and of exact search, timed in alternation; the best round of each damps noise from other load."""
    if index is exact:
        qps, scores, ids = max((timed_search(exact, queries, k) for _ in range(rounds)),
                               key=lambda run: run[0])
        return qps, qps, scores, ids
    best, best_exact = 0.0, 0.0
    for _ in range(rounds):
        best_exact = max(best_exact, timed_search(exact, queries, k)[0])
        qps, scores, ids = timed_search(index, queries, k)
        best = max(best, qps)
    return best, best_exact, scores, ids


def candidate_keys(n: int, dim: int, auto: str) -> list[str]:
    """Exact search first (the baseline), the automatic choice, then HNSW (flat, SQ8), IVF-SQ8 (with an HNSW coarse
    quantiser too, for many lists), IVF-Flat and IVF-PQ + refine."""
    from indexers.choose import HNSW_M, nlist_for, pq_m_for

    nlist, m = nlist_for(n), pq_m_for(dim)
    keys = ["Flat", auto, f"HNSW{HNSW_M}", f"HNSW{HNSW_M}_SQ8", f"IVF{nlist},SQ8",
            *([f"IVF{nlist}_HNSW{HNSW_M},SQ8"] if nlist >= 1024 else []), f"IVF{nlist},Flat",
            f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)"]
    return list(dict.fromkeys(keys))


def check_key(key: str, dim: int) -> None:
    """Fail before any long build when FAISS cannot make `key` (the same message as build_index's)."""
    import faiss

    from indexers.build import faiss_errors
    from indexers.kinds import factory_string

    with faiss_errors(key):
        faiss.index_factory(dim, factory_string(key), faiss.METRIC_INNER_PRODUCT)


@indexer_errors()
def bench_index(n: int = 1_000_000, dim: int = 256, store: str | os.PathLike | None = None,
                keys: list[str] | None = None, queries: int = 1000, k: int = 10, memory_budget: str = "4GB",
                target_recall: float = 0.95, seed: int = 0, threads: int | None = None, goal: str = "latency",
                compare_hnsw: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build and search every candidate index over the same vectors; a JSON-able report.

    `keys` replaces the candidates after Flat (always measured: it is the baseline); "auto" in `keys` stands for
    the automatic choice. Candidates whose estimated size exceeds `memory_budget` are skipped with a note.
    With `store`, the store's vectors minus `queries` held-out rows (the queries) replace the synthetic ones, and
    `n`, `dim` come from the store. Build seconds count train + add + tune, as `retrieval index build` spends them,
    and for the automatic choice also the measured selection. `compare_hnsw` adds HNSW32 tuned to the recall the
    automatic choice reached on the held-out queries: the autofaiss-style baseline, measured in the same run.
    """
    import faiss

    from indexers.build import build_index
    from indexers.choose import HNSW_M, parse_memory
    from indexers.ground_truth import TRUTH_MARGIN, exact_search, recall_at_k, rescorer
    from indexers.kinds import estimate_bytes
    from indexers.select import SAMPLE, check_goal, select_index
    from retrieval.search import check_threads

    budget = parse_memory(memory_budget)
    check_goal(goal)
    if threads is not None:
        check_threads(threads)
    previous_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads or os.cpu_count() or 1)
    try:
        if store is not None:
            data = _store_data(store, queries, seed)
        else:
            data = _synthetic_data(n, dim, queries, seed, progress)
        n, dim, sample, tune_rows, tune_queries, batches, eval_queries = (
            data[key] for key in ("n", "dim", "sample", "tune_rows", "tune_queries", "batches", "queries"))
        started = time.perf_counter()
        selection = select_index(sample(SAMPLE), n, dim, budget, target_recall, k, goal)
        select_seconds = time.perf_counter() - started
        choice = selection.choice
        wanted = ["Flat", *(choice.key if key == "auto" else key for key in keys)] if keys is not None \
            else candidate_keys(n, dim, choice.key)
        wanted = list(dict.fromkeys(wanted))
        for key in wanted:
            check_key(key, dim)
        truth_scores, truth_ids = exact_search(eval_queries, batches, k + TRUTH_MARGIN)
        rescore = rescorer(eval_queries, batches)
        report: dict[str, Any] = {
            "n": n, "dim": dim, "queries": len(eval_queries), "k": k, "data": data["about"],
            "memory_budget": memory_budget, "target_recall": target_recall, "seed": seed,
            "threads": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count(), "faiss_version": faiss.__version__,
            "auto": {"key": choice.key, "reason": choice.reason, "estimated_bytes": choice.bytes, "goal": goal,
                     "select_seconds": round(select_seconds, 3), "trials": [t.to_dict() for t in selection.trials]},
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "candidates": [], "skipped": [],
        }
        exact = None  # the Flat index, kept to time exact search next to every candidate
        runs = [(key, target_recall) for key in wanted]
        while runs:
            key, target = runs.pop(0)
            estimate = estimate_bytes(key, n, dim)
            if key != "Flat" and estimate > budget:  # Flat is the baseline: always measured
                report["skipped"].append({"key": key, "reason": f"needs about {estimate / 2**20:.0f} MiB, over the "
                                                                f"{memory_budget} memory budget"})
                continue
            built = build_index(batches, n, dim, key, sample_vectors=sample, recall_queries=tune_queries,
                                recall_rows=tune_rows, device="cpu", target_recall=target, k=k, progress=progress)
            if exact is None:
                exact = built.index
            qps, exact_qps, scores, ids = side_by_side(built.index, exact, eval_queries, k)
            recall = recall_at_k(ids, truth_ids, truth_scores, k, rescore)
            auto, baseline = key == choice.key and target == target_recall, target != target_recall
            seconds = built.seconds | ({"select": select_seconds} if auto else {})
            report["candidates"].append({
                "key": key, "auto": auto, "hnsw_baseline": baseline, "search_params": built.params,
                "target_recall": round(target, 4),
                "build_seconds": {name: round(s, 3) for name, s in seconds.items()}
                | {"total": round(sum(seconds.values()), 3)},
                "tune_recall": round(built.recall.fair, 4),
                f"ann_recall@{k}": round(recall.fair, 4), f"plain_recall@{k}": round(recall.plain, 4),
                "qps": round(qps, 1), "exact_qps": round(exact_qps, 1), "qps_ratio": round(qps / exact_qps, 2),
                "bytes_per_vector": round(serialized_bytes(built.index) / n, 1),
            })
            if auto and compare_hnsw:  # HNSW tuned to the recall the automatic choice reached
                runs.append((f"HNSW{HNSW_M}", min(recall.fair, 1.0)))
            del built
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        report["bar"] = _bar(report)
        return report
    finally:
        faiss.omp_set_num_threads(previous_threads)


def _synthetic_data(n: int, dim: int, queries: int, seed: int, progress: bool) -> dict[str, Any]:
    from retrieval.indexing import RECALL_QUERIES

    if n < 1 or dim < 1:
        raise RetrievalError(f"cannot benchmark {n} vectors of dimension {dim}")
    params = Synthetic()
    vectors = synthetic_vectors(n, dim, seed, DATABASE, params, progress)
    ids = np.arange(n, dtype=np.int64)

    def batches():
        for lo in range(0, n, CHUNK):
            yield ids[lo:lo + CHUNK], vectors[lo:lo + CHUNK]

    def sample(m: int) -> np.ndarray:
        return vectors[np.sort(np.random.default_rng([seed, 1]).choice(n, min(m, n), replace=False))]

    tune_rows = np.sort(np.random.default_rng([seed, 2]).choice(n, min(RECALL_QUERIES, n), replace=False))
    return {"n": n, "dim": dim, "batches": batches, "sample": sample, "tune_rows": tune_rows,
            "tune_queries": vectors[tune_rows], "queries": synthetic_vectors(queries, dim, seed, QUERIES, params),
            "about": {"source": "synthetic", **asdict(params) | {"rank": min(params.rank, dim)}}}


def _store_data(path: str | os.PathLike, queries: int, seed: int) -> dict[str, Any]:
    """A store's rows minus `queries` held-out rows (capped at a tenth of the store), which become the queries."""
    from retrieval.indexing import RECALL_QUERIES
    from retrieval.store import EmbeddingStore

    store = EmbeddingStore(path)
    store.require_complete()
    count = store.count
    queries = min(queries, count // 10)
    if queries < 1:
        raise RetrievalError(f"store {store.path} holds {count} vectors: too few to hold queries out")
    rng = np.random.default_rng([seed, 3])
    order = rng.permutation(count)
    held, rest = np.sort(order[:queries]), order[queries:]
    n = count - queries

    def batches():
        for ids, vectors in store.iter_batches():
            keep = ~np.isin(ids, held)
            yield ids[keep], vectors[keep]

    def sample(m: int) -> np.ndarray:
        return store.read_vectors(np.sort(rest[:m]))

    tune_rows = np.sort(np.random.default_rng([seed, 2]).choice(rest, min(RECALL_QUERIES, n), replace=False))
    return {"n": n, "dim": store.dim, "batches": batches, "sample": sample, "tune_rows": tune_rows,
            "tune_queries": store.read_vectors(tune_rows), "queries": store.read_vectors(held),
            "about": {"source": "store", "path": str(store.path), "count": count, "encoder": store.encoder["name"]}}


def _bar(report: dict[str, Any]) -> dict[str, Any]:
    auto = next((c for c in report["candidates"] if c["auto"]), None)
    hnsw = next((c for c in report["candidates"] if c["hnsw_baseline"]), None)
    k = report["k"]
    if auto is None:
        return {"holds": False, "why": f"the automatic choice {report['auto']['key']} was not measured"}
    checks = {"ann_recall": auto[f"plain_recall@{k}"] >= BAR["ann_recall"],
              "build_seconds": auto["build_seconds"]["total"] <= BAR["build_seconds"],
              "bytes_per_vector": auto["bytes_per_vector"] <= BAR["bytes_per_vector"]}
    if hnsw is not None:
        checks["hnsw_ratio"] = auto["qps"] >= BAR["hnsw_ratio"] * hnsw["qps"]
    return {"holds": all(checks.values()) and hnsw is not None, "checks": checks,
            "hnsw_ratio": round(auto["qps"] / hnsw["qps"], 2) if hnsw else None,
            "at_bar_size": (report["n"], report["dim"]) == (BAR["n"], BAR["dim"])
            and report["data"]["source"] == "synthetic"}


def report_lines(report: dict[str, Any]) -> list[str]:
    """The printed benchmark: what was measured, a table of candidates, skipped ones, and the bar's verdict."""
    k = report["k"]
    data = report["data"]
    source = (f"synthetic (rank {data['rank']}, {data['clusters']} clusters, spread {data['spread']}, "
              f"noise {data['noise']})"
              if data["source"] == "synthetic" else f"store {data['path']} ({data['encoder']})")
    lines = [f"index benchmark: {report['n']:,} × {report['dim']} vectors, {source}; {report['queries']} held-out "
             f"queries, k={k}, {report['threads']} threads, faiss {report['faiss_version']}",
             f"auto choice: {report['auto']['key']} ({report['auto']['reason']}); 1-min load average "
             f"{report['load_average_at_start'][0]:.1f} at start, {report['load_average_at_end'][0]:.1f} at end "
             f"on {report['cpu_count']} cores (QPS: best of 3 rounds, alternating with exact search)", ""]
    rows = [["index", "build s", "train", "add", "tune", "params", "tuned to", f"recall@{k}", "plain", "QPS",
             "× exact", "bytes/vec"]]
    for c in report["candidates"]:
        s = c["build_seconds"]
        label = " (auto)" if c["auto"] else " (at auto's recall)" if c["hnsw_baseline"] else ""
        rows.append([c["key"] + label, f"{s['total']:.1f}", f"{s['train']:.1f}",
                     f"{s['add']:.1f}", f"{s['tune']:.1f}", c["search_params"] or "-", f"{c['tune_recall']:.3f}",
                     f"{c[f'ann_recall@{k}']:.3f}", f"{c[f'plain_recall@{k}']:.3f}",
                     f"{c['qps']:,.0f}", f"{c['qps_ratio']:.1f}×", f"{c['bytes_per_vector']:.0f}"])
    lines += format_table(rows).splitlines()
    lines += [f"skipped {s['key']}: {s['reason']}" for s in report["skipped"]]
    trials = report["auto"]["trials"]
    if trials:
        lines.append(f"auto measured {len(trials)} candidates on a sample in {report['auto']['select_seconds']:.1f} s "
                     f"(goal: {report['auto']['goal']}): " + "; ".join(
                         f"{t['key']} {t['params'] or 'exact'} recall {t['recall']:.3f} {t['qps']:,.0f} QPS"
                         for t in trials))
    bar = report["bar"]
    goal = (f"plain recall@{k} ≥ {BAR['ann_recall']}, ≥ {BAR['hnsw_ratio']}× the QPS of HNSW32 at the same "
            f"recall, built in ≤ {BAR['build_seconds']:.0f} s, ≤ {BAR['bytes_per_vector']:.0f} bytes/vector")
    auto = next((c for c in report["candidates"] if c["auto"]), None)
    if auto is None:
        lines.append(f"bar ({goal}): not measured: {bar['why']}")
        return lines
    failed = [n for n, ok in bar["checks"].items() if not ok]
    verdict = "holds" if bar["holds"] else f"fails ({', '.join(failed)})" if failed else "not judged"
    where = "" if bar["at_bar_size"] else (f" [the bar is set at {BAR['n']:,} × {BAR['dim']} synthetic; "
                                           f"this run is {report['n']:,} × {report['dim']}]")
    versus = f"{bar['hnsw_ratio']:.2f}× HNSW32" if bar["hnsw_ratio"] else "HNSW32 not measured (--compare-hnsw)"
    lines.append(f"bar ({goal}): {verdict} for {auto['key']}: plain recall {auto[f'plain_recall@{k}']:.3f}, "
                 f"{versus}, built in {auto['build_seconds']['total']:.1f} s, {auto['bytes_per_vector']:.0f} "
                 f"bytes/vector{where}")
    return lines
