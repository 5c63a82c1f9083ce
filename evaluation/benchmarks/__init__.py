"""The field's own benchmarks, read from the layouts they are published in: one reader module per benchmark.

Each reader turns a local copy into a `Benchmark` — tasks in the engine's own form (evaluation/tasks.py) plus
the means the benchmark reports — so one scorer serves them all. Readers are named "module:function" and
imported on use; each takes (root, subsets, limit, protocol).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from evaluation.benchmarks.layout import Benchmark
from retrieval.errors import RetrievalError
from retrieval.paths import PathPolicy

BENCHMARKS = {
    "mmeb": "evaluation.benchmarks.mmeb:read_mmeb",
    "cirr": "evaluation.benchmarks.cirr:read_cirr",
    "fashioniq": "evaluation.benchmarks.fashioniq:read_fashioniq",
    "coco": "evaluation.benchmarks.karpathy:read_coco",
    "flickr30k": "evaluation.benchmarks.karpathy:read_flickr30k",
    "imagefolder": "evaluation.benchmarks.imagefolder:read_imagefolder",
}
PROTOCOLS = {"mmeb": ("mmeb", "fuselip")}  # the first is the default


def read_benchmark(name: str, root: str | os.PathLike, subsets: list[str] | None = None, limit: int | None = None,
                   protocol: str | None = None, follow_symlinks: bool = False) -> Benchmark:
    """Read benchmark `name` from its published layout under `root`; its images may be read through symlinks that
    lead out of `root` only with `follow_symlinks`."""
    if name not in BENCHMARKS:
        raise RetrievalError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    protocols = PROTOCOLS.get(name, ("official",))
    protocol = protocol or protocols[0]
    if protocol not in protocols:
        raise RetrievalError(f"--protocol {protocol} does not apply to {name}; it has {', '.join(protocols)}")
    if limit is not None and limit < 1:
        raise RetrievalError(f"--limit must be at least 1, got {limit}")
    root = Path(root)
    if not root.is_dir():
        raise RetrievalError(f"--data {root}: no such folder")
    module, function = BENCHMARKS[name].split(":")
    bench = getattr(importlib.import_module(module), function)(root.resolve(), subsets, limit, protocol)
    policy = PathPolicy.for_root(bench.root, follow_symlinks=follow_symlinks, root_only=True)
    for item in bench.items():
        if item.image and (problem := policy.problem(item.image)):
            raise RetrievalError(f"{name}: {problem}")
    return bench
