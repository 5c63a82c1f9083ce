"""`retrieval bench ray` and `retrieval bench shards`: what scaling out costs and saves on this machine.

- ray: the encode job on N ShapesWorld items, run locally and with `--engine ray` (a local Ray instance with every
  core; one embedding actor), side by side in one process: items/s of each and their ratio, which on one machine
  is Ray's fixed overhead.
- shards: `retrieval index build --shards 1` against `--shards S` over N synthetic embedding-like vectors, each as
  its own CLI process: wall seconds, the seconds index.json records, the peak resident memory of the driver and of
  the largest shard process (sampled from /proc: anonymous memory, which the process holds, and all of it, which
  adds the pages of memory-mapped files the kernel may drop), the index and lists file sizes, ann_recall@10, and
  the QPS of batch search of 1,000 new queries at the tuned parameters, its lists in the page cache (warm).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from evaluation.bench.common import format_table, mib, timed


def bench_ray(model: str = "test-tiny", n: int = 10_000, batch_size: int = 256, actors: int = 1,
              progress: bool = True) -> dict[str, Any]:
    """The local encode job against `--engine ray` on the same N items."""
    from evaluation.shapesworld import make_shapesworld
    from retrieval.encode import encode_corpus
    from retrieval.ray_cluster import connect

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as folder:
        root = Path(folder)
        corpus = make_shapesworld(root / "data", n=n, size=64, seed=0, train_pairs=False, progress=progress)
        runs = {}
        with timed() as start:
            connect(None)
        for engine in ("local", "ray"):
            with timed() as t:
                summary = encode_corpus(corpus, root / engine, model, batch_size=batch_size, progress=progress,
                                        engine=engine, ray={"actors": actors})
            runs[engine] = {"seconds": t["seconds"], "items_per_s": n / t["seconds"], "encoded": summary.encoded}
    return {"benchmark": "ray", "model": model, "n": n, "batch_size": batch_size, "actors": actors,
            "cpu_count": os.cpu_count(), "ray_start_seconds": start["seconds"], "runs": runs,
            "ratio": runs["ray"]["items_per_s"] / runs["local"]["items_per_s"]}


def ray_lines(report: dict[str, Any]) -> list[str]:
    rows = [["engine", "seconds", "items/s"]]
    rows += [[engine, f"{r['seconds']:.1f}", f"{r['items_per_s']:.0f}"] for engine, r in report["runs"].items()]
    return [f"encode {report['n']} items with {report['model']} (batch {report['batch_size']}, "
            f"{report['actors']} actor, {report['cpu_count']} cores); Ray started in "
            f"{report['ray_start_seconds']:.1f} s (not counted)", format_table(rows),
            f"ray / local: {report['ratio']:.2f}× the items/s"]


def memory_of(pid: int) -> tuple[int, int]:
    """(anonymous, total) resident bytes of a process; (0, 0) once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["RssAnon"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


def children_of(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def warm_qps(folder: Path, queries: int = 1000) -> float:
    """Batch-search QPS of an index folder at its tuned parameters, for new queries (k = 10)."""
    import faiss

    from evaluation.bench.index import QUERIES, synthetic_vectors
    from indexers.select import timed_search
    from retrieval.index_folder import read_index_folder

    info, index = read_index_folder(folder)
    faiss.ParameterSpace().set_index_parameters(index, info["search_params"])
    return timed_search(index, synthetic_vectors(queries, info["dim"], 0, QUERIES), 10)[0]


def build_process(store: Path, out: Path, key: str, shards: int) -> dict[str, Any]:
    """`retrieval index build --shards` as a child process: wall seconds and the peak memory of the driver and of
    its largest child (a shard process), sampled every 20 ms."""
    command = [str(Path(sys.executable).with_name("retrieval")), "index", "build", str(store), "--out", str(out),
               "--index-key", key, "--shards", str(shards)]
    peaks = {"driver": [0, 0], "shard": [0, 0]}
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while child.poll() is None:
        for role, pids in (("driver", [child.pid]), ("shard", children_of(child.pid))):
            for pid in pids:
                peaks[role] = [max(a, b) for a, b in zip(peaks[role], memory_of(pid))]
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {child.stderr.read().decode()[-2000:]}")
    info = json.loads((out / "index.json").read_text())
    return {"shards": shards, "wall_seconds": seconds, "seconds": info["seconds"], "qps": warm_qps(out),
            "peak_anon": {role: p[0] for role, p in peaks.items()},
            "peak_rss": {role: p[1] for role, p in peaks.items()},
            "index_bytes": info["index_bytes"], "lists_bytes": info["lists_bytes"],
            "ann_recall@10": info["ann_recall@10"], "search_params": info["search_params"], "key": info["index_key"]}


def bench_shards(n: int = 1_000_000, dim: int = 256, shards: int = 4, key: str = "auto",
                 progress: bool = True) -> dict[str, Any]:
    """--shards 1 against --shards S over the same synthetic store."""
    from evaluation.bench.index import DATABASE, synthetic_vectors
    from evaluation.bench.update import vector_store
    from indexers.choose import sharded_choice

    key = sharded_choice(n, dim).key if key == "auto" else key
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as folder:
        root = Path(folder)
        with timed() as t:
            vector_store(root / "store", synthetic_vectors(n, dim, 0, DATABASE))
        runs = [build_process(root / "store", root / f"index-{s}", key, s) for s in (1, shards)]
    return {"benchmark": "shards", "n": n, "dim": dim, "key": key, "cpu_count": os.cpu_count(),
            "store_seconds": t["seconds"], "runs": runs}


def shards_lines(report: dict[str, Any]) -> list[str]:
    rows = [["shards", "wall s", "train s", "add s", "tune s", "driver anon", "driver all", "shard anon",
             "shard all", "lists", "recall@10", "QPS"]]
    rows += [[str(r["shards"]), f"{r['wall_seconds']:.1f}", f"{r['seconds']['train']:.1f}",
              f"{r['seconds']['add']:.1f}", f"{r['seconds']['tune']:.1f}", mib(r["peak_anon"]["driver"]),
              mib(r["peak_rss"]["driver"]), mib(r["peak_anon"]["shard"]), mib(r["peak_rss"]["shard"]),
              mib(r["lists_bytes"]), f"{r['ann_recall@10']:.3f}", f"{r['qps']:.0f}"] for r in report["runs"]]
    one, many = report["runs"]
    return [f"index build {report['key']} over {report['n']} × {report['dim']} synthetic vectors "
            f"({report['cpu_count']} cores); peak resident memory of the driver and of the largest shard process, "
            "anonymous and all (with mapped file pages)", format_table(rows),
            f"--shards {many['shards']} / --shards 1: {many['wall_seconds'] / one['wall_seconds']:.2f}× the time, "
            f"{many['peak_anon']['shard'] / one['peak_anon']['shard']:.2f}× a shard process's anonymous memory"]
