"""The benchmark data sets by name, and the cached default copy of each that `retrieval eval` uses."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from retrieval.cache import cache_root
from retrieval.errors import RetrievalError

# name → the function that writes it (imported on use); each takes (out, n, size, seed, train_pairs, progress)
DATASETS = {"shapesworld": "evaluation.shapesworld:make_shapesworld", "digits": "evaluation.digits:make_digits"}
DEFAULT_SIZE = 64


def make_data(name: str, out: str | os.PathLike, n: int | None = None, size: int = DEFAULT_SIZE, seed: int = 0,
              train_pairs: bool = True, progress: bool = True) -> Path:
    """Generate benchmark data set `name` into `out` (default n: 2,000 scenes / all 1,797 digits); returns
    its corpus.jsonl."""
    if name not in DATASETS:
        raise RetrievalError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if n is not None and n < 10:
        raise RetrievalError("--n must be at least 10, so that every split gets items")
    if not 16 <= size <= 256:
        raise RetrievalError("--size must be between 16 and 256 pixels")
    out = Path(out)
    if out.is_file():
        raise RetrievalError(f"--out {out} is a file, not a folder")
    module, function = DATASETS[name].split(":")
    maker = getattr(importlib.import_module(module), function)
    sized = {} if n is None else {"n": n}  # None: the data set's own default
    return maker(out, size=size, seed=seed, train_pairs=train_pairs, progress=progress, **sized)


def default_data_dir(name: str, progress: bool = True) -> Path:
    """The default copy of data set `name` (made on first use, without training pairs)."""
    from evaluation.benchmark_folder import DATASET_JSON

    folder = cache_root() / "data" / f"{name}-default-{DEFAULT_SIZE}px-seed0"
    if not (folder / DATASET_JSON).is_file():
        make_data(name, folder, train_pairs=False, progress=progress)
    return folder
