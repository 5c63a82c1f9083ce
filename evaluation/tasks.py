"""Benchmark tasks on disk: a query set, a candidate pool and the ground truth, one folder per task.

    DATA/tasks/NAME/task.json         name, dataset, kind, primary metric, description
    DATA/tasks/NAME/candidates.jsonl  id, image, text — a corpus manifest `retrieval index build` takes as it is
    DATA/tasks/NAME/queries.jsonl     id, image, text, positives, [candidates], [type], [exclude]

A `pool` task ranks every query against the whole candidate pool; a `candidates` task ranks each
query against its own candidate list (e.g. the transformations of one image). Image paths are
relative to the file that names them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError
from retrieval.files import read_json, read_jsonl, write_json, write_jsonl

TASK_FORMAT = "retrieval.task"
KINDS = ("pool", "candidates")


@dataclass(frozen=True)
class Item:
    """A query or a candidate: an image path, a text, or both."""

    id: str
    image: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class Query:
    item: Item
    positives: tuple[str, ...]
    candidates: tuple[str, ...] | None = None  # None: the whole pool
    type: str | None = None  # sub-task, scored separately (e.g. the tgit transformation)
    exclude: tuple[str, ...] = ()  # candidates left out of this query's ranking (CIRR's reference image)


@dataclass
class Task:
    name: str
    dataset: str
    kind: str
    primary: str
    description: str
    queries: list[Query]
    candidates: list[Item]
    by_type: bool = False  # primary = mean of the per-type scores (tgit), not the mean over queries
    root: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def candidate_index(self) -> dict[str, int]:
        return {c.id: i for i, c in enumerate(self.candidates)}


def _relative(path: str | None, base: Path) -> str | None:
    return None if path is None else os.path.relpath(path, base)


def _query_record(q: Query, base: Path) -> dict[str, Any]:
    record: dict[str, Any] = {"id": q.item.id, "image": _relative(q.item.image, base), "text": q.item.text,
                              "positives": list(q.positives)}
    if q.candidates is not None:
        record["candidates"] = list(q.candidates)
    if q.type is not None:
        record["type"] = q.type
    if q.exclude:
        record["exclude"] = list(q.exclude)
    return record


def write_task(task: Task, folder: str | os.PathLike) -> Path:
    """Write task.json, candidates.jsonl and queries.jsonl; item image paths are absolute or cwd-relative."""
    if task.kind not in KINDS:
        raise RetrievalError(f"task kind must be one of {KINDS}, not {task.kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder.resolve()
    write_jsonl(folder / "candidates.jsonl",
                ({"id": c.id, "image": _relative(c.image, base), "text": c.text} for c in task.candidates))
    write_jsonl(folder / "queries.jsonl", (_query_record(q, base) for q in task.queries))
    write_json(folder / "task.json", {
        "format": TASK_FORMAT, "name": task.name, "dataset": task.dataset, "kind": task.kind,
        "primary": task.primary, "by_type": task.by_type, "description": task.description,
        "queries": len(task.queries), "candidates": len(task.candidates), **task.extra})
    return folder


def read_task(folder: str | os.PathLike) -> Task:
    """Read a task folder back, with absolute image paths, checking that the ground truth is consistent."""
    folder = Path(folder).resolve()
    if not (folder / "task.json").is_file():
        raise RetrievalError(f"{folder} is not a task folder (no task.json)")
    meta = read_json(folder / "task.json")
    if meta.get("format") != TASK_FORMAT:
        raise RetrievalError(f"{folder / 'task.json'} is not a task description")

    def item(r: dict[str, Any]) -> Item:
        image = os.path.normpath(folder / r["image"]) if r.get("image") else None  # one path per file across tasks
        return Item(r["id"], image, r.get("text"))

    candidates = [item(r) for r in read_jsonl(folder / "candidates.jsonl")]
    known = {c.id for c in candidates}
    queries = []
    for r in read_jsonl(folder / "queries.jsonl"):
        cands = tuple(r["candidates"]) if "candidates" in r else None
        positives, exclude = tuple(r["positives"]), tuple(r.get("exclude", ()))
        allowed = set(cands) if cands is not None else known
        if (not positives or not set(positives) <= allowed - set(exclude) or not set(exclude) <= allowed
                or (cands is not None and not set(cands) <= known)):
            raise RetrievalError(f"task {meta['name']}: query {r['id']} names candidates that are not in its pool")
        queries.append(Query(item(r), positives, cands, r.get("type"), exclude))
    extra = {k: v for k, v in meta.items() if k not in {"format", "name", "dataset", "kind", "primary", "by_type",
                                                         "description", "queries", "candidates"}}
    return Task(meta["name"], meta["dataset"], meta["kind"], meta["primary"], meta["description"], queries,
                candidates, bool(meta.get("by_type")), folder, extra)


def list_tasks(data_dir: str | os.PathLike) -> list[str]:
    """Names of the tasks written under DATA/tasks/."""
    root = Path(data_dir) / "tasks"
    return sorted(p.name for p in root.iterdir() if (p / "task.json").is_file()) if root.is_dir() else []
