"""`retrieval eval`: every model (in each of its fusion modes) × every task → one report.

Queries and candidates are embedded by the model exactly as `index build` and `search` embed them
(an image-only candidate is (image, no text)); scores are inner products of unit vectors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from evaluation.benchmark_folder import read_dataset
from evaluation.data import DATASETS, default_data_dir
from evaluation.metrics import chance_metrics, mean_metrics, query_metrics
from evaluation.tasks import Item, Query, Task, list_tasks, read_task
from retrieval.errors import RetrievalError

if TYPE_CHECKING:
    from retrieval.encoders.base import Encoder

EVAL_FORMAT = "retrieval.eval"


class EmbeddingCache:
    """Embeddings of (image, text) items under one encoder and fusion mode, computed once per run."""

    def __init__(self, encoder, batch_size: int = 128, progress: bool = True):
        self.encoder = encoder
        self.batch_size = batch_size
        self.progress = progress
        self.vectors: dict[tuple[str | None, str | None], np.ndarray] = {}

    def embed(self, items: Sequence[Item], desc: str = "embed") -> np.ndarray:
        keys = [(it.image, it.text or None) for it in items]
        todo = list(dict.fromkeys(k for k in keys if k not in self.vectors))
        bar = tqdm(total=len(todo), desc=desc, unit="item", disable=not self.progress or not todo, leave=False)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            images = [img for img, _ in chunk]
            texts = [txt for _, txt in chunk]
            vectors = self.encoder.encode(images=images if any(images) else None,
                                          texts=texts if any(texts) else None, batch_size=self.batch_size)
            self.vectors.update(zip(chunk, vectors))
            bar.update(len(chunk))
        bar.close()
        return np.stack([self.vectors[k] for k in keys]) if keys else np.zeros((0, self.encoder.dim), np.float32)


Rescorer = Callable[[Query, list[str], np.ndarray], np.ndarray]


BLOCK_SCORES = 32_000_000  # at most this many query × pool scores at once (128 MB of float32)


def _query_scores(task: Task, queries: np.ndarray, candidates: np.ndarray
                  ) -> Iterator[tuple[Query, np.ndarray, np.ndarray]]:
    """(query, positions of its candidates in the pool, their scores) for every query, its excluded candidates
    left out. Scores come from one matrix product per block of queries against the whole pool (a query with its
    own candidate list picks its scores out of its row), or one product per query where the pool is too large."""
    index = task.candidate_index()
    pool = np.arange(len(task.candidates))
    block = max(1, min(1024, BLOCK_SCORES // max(len(task.candidates), 1)))
    for start in range(0, len(task.queries), block):
        chunk = task.queries[start:start + block]
        listed = all(q.candidates is not None for q in chunk)
        scores_of = None if listed and len(task.candidates) > BLOCK_SCORES // 64 \
            else queries[start:start + block] @ candidates.T
        for offset, q in enumerate(chunk):
            where = pool if q.candidates is None else np.array([index[c] for c in q.candidates], dtype=np.int64)
            scores = candidates[where] @ queries[start + offset] if scores_of is None else scores_of[offset][where]
            if q.exclude:
                keep = ~np.isin(where, [index[c] for c in q.exclude])
                where, scores = where[keep], scores[keep]
            yield q, where, scores


def score_task(task: Task, queries: np.ndarray, candidates: np.ndarray, ks: Sequence[int],
               rescore: Rescorer | None = None) -> dict[str, Any]:
    """Rank each query's candidates by inner product (then `rescore`, if given); metrics per query, per type,
    and their means."""
    if "@" in task.primary:  # the primary metric is always measured, whatever cut-offs were asked for
        ks = list(dict.fromkeys([*ks, int(task.primary.split("@")[1])]))
    per_query, per_type, chance = [], {}, []
    index = task.candidate_index()
    for q, where, scores in _query_scores(task, queries, candidates):
        if rescore is not None:
            scores = rescore(q, [task.candidates[i].id for i in where], scores)
        mask = np.isin(where, [index[p] for p in q.positives])
        metrics = query_metrics(scores, mask, ks)
        per_query.append(metrics)
        chance.append(chance_metrics(len(mask), int(mask.sum()), ks)[task.primary])
        if q.type is not None:
            per_type.setdefault(q.type, []).append((metrics, chance[-1]))
    by_type = {t: mean_metrics([m for m, _ in rows]) for t, rows in per_type.items()}
    if task.by_type and by_type:
        metrics = mean_metrics(list(by_type.values()))  # each type counts the same, as in the FuseLIP paper
        chance_level = float(np.mean([np.mean([c for _, c in rows]) for rows in per_type.values()]))
    else:
        metrics, chance_level = mean_metrics(per_query), float(np.mean(chance))
    out = {"metrics": metrics, "chance": chance_level}
    if by_type:
        out["by_type"] = by_type
    return out


def evaluate_task(task: Task, cache: EmbeddingCache, ks: Sequence[int], rescore: Rescorer | None = None
                  ) -> dict[str, Any]:
    """One result row (without model and fusion) for a task, embedding what the cache does not hold yet."""
    start = time.perf_counter()
    candidates = cache.embed(task.candidates, desc=f"{task.name} candidates")
    queries = cache.embed([q.item for q in task.queries], desc=f"{task.name} queries")
    row = {"dataset": task.dataset, "task": task.name, "primary": task.primary, "type_mean": task.by_type,
           "queries": len(task.queries), "candidates": len(task.candidates),
           **score_task(task, queries, candidates, ks, rescore)}
    row["seconds"] = time.perf_counter() - start
    return row


def select_tasks(names: str, data_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Task folders named by `names` ('all', or a comma list of task or dataset/task names) in the data dirs."""
    available: list[tuple[str, str, Path]] = []
    seen: dict[str, str | os.PathLike] = {}
    for root in data_dirs:
        meta = read_dataset(root)
        if meta["name"] in seen:
            raise RetrievalError(f"{seen[meta['name']]} and {root} both hold {meta['name']}: evaluate one at a time")
        seen[meta["name"]] = root
        written = set(list_tasks(root))
        names_in_order = [t for t in meta.get("tasks", {}) if t in written]
        available += [(meta["name"], t, Path(root) / "tasks" / t) for t in names_in_order]
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise RetrievalError("name at least one task, or all")
    if wanted == ["all"]:
        return [path for _, _, path in available]
    chosen = []
    for name in wanted:
        hits = [path for dataset, t, path in available if name in (t, f"{dataset}/{t}")]
        if not hits:
            known = ", ".join(sorted({t for _, t, _ in available} | {f"{d}/{t}" for d, t, _ in available}))
            raise RetrievalError(f"no task {name!r} in the data; known: all, {known}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def text_to_image(task: Task) -> bool:
    """Whether every query is a text alone and every candidate an image alone (what re-ranking serves)."""
    return (all(q.item.image is None and q.item.text for q in task.queries)
            and all(c.image is not None and not c.text for c in task.candidates))


def reranker(encoder, task: Task, n: int) -> Rescorer:
    """Re-score each query's best `n` candidates by the model's fine-grained alignment (retrieval.rerank)."""
    from retrieval.rerank import rerank_top

    images = {c.id: c.image for c in task.candidates}

    def rescore(query: Query, ids: list[str], scores: np.ndarray) -> np.ndarray:
        order, _ = rerank_top(encoder, query.item.text, [images[i] for i in ids], scores, n)
        ranked = np.empty(len(ids), np.float32)
        ranked[order] = -np.arange(len(ids), dtype=np.float32)  # metrics only need the order
        return ranked

    return rescore


def model_names(models: str | Sequence[str | Encoder]) -> list[str | Encoder]:
    """'all', comma-separated names or checkpoint folders, or a list of names and loaded encoders, as a list."""
    names = [m.strip() for m in models.split(",") if m.strip()] if isinstance(models, str) else list(models)
    if names == ["all"]:
        from retrieval.encoders.registry import list_configs

        names = list(list_configs())
    if not names:
        raise RetrievalError("name at least one model, or all")
    return names


def fusion_modes(encoder) -> tuple[str, ...]:
    """The fusion modes to evaluate: each of a late-fusion encoder's modes, else its one fusion."""
    return encoder.fusion_modes or (encoder.fusion,)


def run_eval(tasks: str = "all", models: str | Sequence[str | Encoder] = "test-tiny",
             data: Sequence[str | os.PathLike] | None = None,
             ks: Sequence[int] = (1, 5, 10), device: str = "auto", batch_size: int = 128,
             progress: bool = True, rerank: int = 0) -> dict[str, Any]:
    """Evaluate every model (each fusion mode) on every selected task; returns the report dict.

    `models`: 'all', comma-separated names or checkpoint folders, or a list of names and loaded encoders.
    `rerank` > 0 adds a row per model that can re-rank: its text → image tasks with the best `rerank`
    candidates re-scored by fine-grained alignment (fusion column "rerank@N").
    """
    from retrieval.encoders import load_encoder

    if not ks or any(k <= 0 for k in ks):
        raise RetrievalError("k values must be positive integers, e.g. --k 1,5,10")
    if rerank < 0:
        raise RetrievalError(f"--rerank must be ≥ 0, got {rerank}")
    data_dirs = list(data) if data else [default_data_dir(name, progress=progress) for name in DATASETS]
    folders = select_tasks(tasks, data_dirs)
    loaded = [read_task(f) for f in folders]
    results = []
    for model in model_names(models):
        encoder = load_encoder(model, device=device) if isinstance(model, (str, os.PathLike)) else model
        name = str(model) if isinstance(model, (str, os.PathLike)) else encoder.name
        for mode in fusion_modes(encoder):
            if encoder.fusion_modes:
                encoder.fusion_mode = mode
            cache = EmbeddingCache(encoder, batch_size, progress)
            for task in loaded:
                row = evaluate_task(task, cache, ks)
                results.append({"model": name, "fusion": mode, **row})
        if rerank and encoder.supports("word_alignment"):
            cache = EmbeddingCache(encoder, batch_size, progress)
            for task in filter(text_to_image, loaded):
                row = evaluate_task(task, cache, ks, reranker(encoder, task, rerank))
                results.append({"model": name, "fusion": f"rerank@{rerank}", **row})
    return {"format": EVAL_FORMAT, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "k": list(ks), "data": {read_dataset(d)["name"]: str(Path(d).resolve()) for d in data_dirs},
            "results": results}
