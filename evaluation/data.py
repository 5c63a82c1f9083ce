"""The benchmark data sets by name, and the cached default copy of each that `retrieval eval` uses."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from retrieval.errors import RetrievalError


def _shapesworld(out: Path, n: int | None, size: int, seed: int, train_pairs: bool, progress: bool) -> Path:
    from evaluation.shapesworld import make_shapesworld

    return make_shapesworld(out, n=2000 if n is None else n, size=size, seed=seed, train_pairs=train_pairs,
                            progress=progress)


def _digits(out: Path, n: int | None, size: int, seed: int, train_pairs: bool, progress: bool) -> Path:
    from evaluation.digits import make_digits

    return make_digits(out, n=n, size=size, seed=seed, train_pairs=train_pairs, progress=progress)


DATASETS: dict[str, Callable[..., Path]] = {"shapesworld": _shapesworld, "digits": _digits}
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
    return DATASETS[name](out, n, size, seed, train_pairs, progress)


def cache_root() -> Path:
    return Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval"))


def default_data_dir(name: str, progress: bool = True) -> Path:
    """The default copy of data set `name` (made on first use, without training pairs)."""
    from evaluation.benchmark_folder import DATASET_JSON

    folder = cache_root() / "data" / f"{name}-default-{DEFAULT_SIZE}px-seed0"
    if not (folder / DATASET_JSON).is_file():
        make_data(name, folder, train_pairs=False, progress=progress)
    return folder
