"""What every benchmark folder shares: its training pairs, and dataset.json, written last."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evaluation.tasks import Task
from retrieval.errors import RetrievalError
from retrieval.files import read_json, write_json
from retrieval.training.pairs import write_pairs

DATASET_FORMAT = "retrieval.dataset"
DATASET_JSON = "dataset.json"


def finish_dataset(root: Path, name: str, params: dict[str, Any], corpus: list[dict[str, Any]], tasks: list[Task],
                   pairs: list[dict[str, Any]] | None) -> Path:
    """Write the training pairs (retrieval.training.pairs) and then dataset.json; returns corpus.jsonl."""
    if pairs is not None:
        write_pairs(root, name, pairs)
    splits: dict[str, int] = {}
    for record in corpus:
        splits[record["split"]] = splits.get(record["split"], 0) + 1
    write_json(root / DATASET_JSON, {
        "format": DATASET_FORMAT, "name": name, **params, "items": len(corpus), "splits": splits,
        "tasks": {t.name: {"queries": len(t.queries), "candidates": len(t.candidates), "primary": t.primary}
                  for t in tasks},
        "train_pairs": None if pairs is None else len(pairs),
        "train_groups": None if pairs is None else len({p["group"] for p in pairs})})
    return root / "corpus.jsonl"


def read_dataset(root: str | os.PathLike) -> dict[str, Any]:
    """dataset.json of a finished benchmark folder."""
    path = Path(root) / DATASET_JSON
    if not path.is_file():
        raise RetrievalError(f"{root} is not a finished benchmark folder (no {DATASET_JSON}); "
                             "make one with `retrieval data make`")
    meta = read_json(path)
    if meta.get("format") != DATASET_FORMAT:
        raise RetrievalError(f"{path} is not a benchmark folder description")
    return meta
