"""`retrieval eval BENCH --data DIR`: every model (each fusion mode) on one of the field's benchmarks, read
from its published layout (evaluation/benchmarks/), with the papers' published figures beside ours.

The rows have the shape of `retrieval eval`'s report (evaluation/report.py renders both); a benchmark's
summary rows (MMEB's category means, FashionIQ's average, COCO's 1k folds and rsum) follow its task rows,
and published figures are rows of their own, their model named "… [published]".
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from evaluation.benchmark_cache import Key, embed_items
from evaluation.benchmarks import read_benchmark
from evaluation.benchmarks.layout import Benchmark, Summary
from evaluation.evaluate import EVAL_FORMAT, fusion_modes, model_names, score_task
from evaluation.metrics import mean_metrics
from evaluation.published import published_rows

if TYPE_CHECKING:
    from retrieval.encoders.base import Encoder

RSUM_KS = (1, 5, 10)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def score_benchmark(bench: Benchmark, vectors: dict[Key, np.ndarray]) -> list[dict[str, Any]]:
    """One result row per task that is not folded, then one per summary."""
    def vector(item) -> np.ndarray:
        members = bench.ensembles.get(item.id)
        if members is None:
            return vectors[(item.image, item.text or None)]
        return _unit(np.mean([vectors[(m.image, m.text or None)] for m in members], axis=0))

    rows: dict[str, dict[str, Any]] = {}
    for task in bench.tasks:
        start = time.perf_counter()
        queries = np.stack([vector(q.item) for q in task.queries])
        candidates = np.stack([vector(c) for c in task.candidates])
        scored = score_task(task, queries, candidates, task.extra["ks"])
        rows[task.name] = {"dataset": task.dataset, "task": task.name, "primary": task.primary, "type_mean": False,
                           "queries": len(task.queries), "candidates": len(task.candidates), **scored,
                           "seconds": time.perf_counter() - start}
    for summary in bench.summaries:
        rows[summary.name] = _summary_row(bench, summary, [rows[name] for name in summary.tasks])
    return [row for name, row in rows.items() if name not in bench.folded]


def _summary_row(bench: Benchmark, summary: Summary, members: list[dict[str, Any]]) -> dict[str, Any]:
    partial = len(members) < summary.defined
    name = f"{summary.name} ({len(members)} of {summary.defined})" if partial else summary.name
    row = {"dataset": bench.name, "task": name, "summary_of": list(summary.tasks), "type_mean": False}
    if summary.kind == "rsum":
        total = sum(m["metrics"][f"hit@{k}"] for m in members for k in RSUM_KS)
        return {**row, "primary": "rsum", "metrics": {"rsum": total}, "chance": None}
    chances = [m["chance"] for m in members if m.get("chance") is not None]
    return {**row, "primary": members[0]["primary"], "metrics": mean_metrics([m["metrics"] for m in members]),
            "chance": float(np.mean(chances)) if chances else None}


def run_benchmark(benchmark: str, data: str | os.PathLike, models: str | list[str | Encoder] = "test-tiny",
                  subsets: list[str] | None = None, limit: int | None = None, protocol: str | None = None,
                  device: str = "auto", batch_size: int = 128, progress: bool = True,
                  follow_symlinks: bool = False) -> dict[str, Any]:
    """Evaluate every model (each fusion mode) on `benchmark` read from `data`; returns the report dict."""
    from retrieval.encoders import load_encoder

    bench = read_benchmark(benchmark, data, subsets, limit, protocol, follow_symlinks)
    items = bench.items()
    composed = any(item.image and item.text for item in items)
    results: list[dict[str, Any]] = []
    for model in model_names(models):
        encoder = load_encoder(model, device=device) if isinstance(model, (str, os.PathLike)) else model
        name = str(model) if isinstance(model, (str, os.PathLike)) else encoder.name
        for mode in fusion_modes(encoder)[:None if composed else 1]:  # modes differ only on image + text items
            if encoder.fusion_modes:
                encoder.fusion_mode = mode
            vectors = embed_items(bench.name, bench.root, items, encoder, batch_size, progress, follow_symlinks)
            results += [{"model": name, "fusion": mode, **row} for row in score_benchmark(bench, vectors)]
    if limit is None:  # a sample of the queries is no match for the papers' figures
        results += published_rows(bench.name, bench.protocol, {r["task"] for r in results})
    return {"format": EVAL_FORMAT, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "benchmark": bench.name, "protocol": bench.protocol, "limit": limit,
            "data": {bench.name: str(bench.root)}, "results": results}
