"""An IVF index filled in shards and merged on disk, for stores larger than one machine's memory.

The coarse quantiser (and any PQ or SQ codes) is trained once, by the caller. The trained, empty index is copied
to every shard; each shard adds its own rows (in a process of a local pool, or a Ray task) and writes itself to a
file; the shards' inverted lists are then merged, list by list, into one FAISS `OnDiskInvertedLists` file that a
search memory-maps. Every list holds exactly the codes an unsharded build with the same trained index would hold,
so a search with the same `nprobe` returns the same neighbours. A shard process holds one shard; the merge reads
the shards memory-mapped and writes through a mapping; neither holds all the lists in RAM.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexers.errors import IndexerError

Batches = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
MAX_SHARDS = 4096


@dataclass(frozen=True)
class Shard:
    rows: Batches  # picklable: it runs in another process
    path: Path  # where the filled shard is written


def on_disk_problem(index) -> str | None:
    """Why an index cannot keep its lists on disk, or None: only an IVF index whose lists are plain arrays can
    (not a refined one, which keeps a copy of every vector in RAM, nor fast-scan, whose lists are packed blocks)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return "it has no inverted lists (only IVF kinds can be sharded)"
    if isinstance(index, faiss.IndexRefine | faiss.IndexIDMap | faiss.IndexIDMap2):
        return f"{type(index).__name__} keeps vectors or ids beside its lists, in RAM"
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQR) or not isinstance(faiss.downcast_InvertedLists(ivf.invlists),
                                                            faiss.ArrayInvertedLists):
        return f"{type(ivf).__name__} packs its lists in a form the on-disk lists cannot hold"
    return None


def check_on_disk_key(key: str, dim: int) -> None:
    """Refuse, before any training, a key whose index cannot keep its lists on disk."""
    import faiss

    from indexers.kinds import factory_string

    if problem := on_disk_problem(faiss.index_factory(dim, factory_string(key), faiss.METRIC_INNER_PRODUCT)):
        raise IndexerError(f"--index-key {key} cannot be built in shards: {problem}; use an IVF key such as "
                           "IVF1024,SQ8 or IVF1024,PQ32")


def check_shards(shards: int) -> None:
    if not 1 <= shards <= MAX_SHARDS:
        raise IndexerError(f"--shards must be 1 to {MAX_SHARDS}, got {shards}")


def fill_shard(trained: np.ndarray, shard: Shard, threads: int) -> int:
    """Add a shard's rows to a copy of the trained index and write it to `shard.path`; returns its vector count."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.deserialize_index(trained)
    for ids, vectors in shard.rows():
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
    faiss.write_index(index, str(shard.path))
    return int(index.ntotal)


def fill_shards(trained_index, shards: list[Shard], engine: str, workers: int) -> list[int]:
    """Fill every shard, `workers` at a time, in local processes or as Ray tasks (on the cluster `ray.init` joined)."""
    import faiss

    trained = faiss.serialize_index(trained_index)
    threads = max(1, (os.cpu_count() or 1) // workers)
    if engine == "ray":
        import ray

        task = ray.remote(num_cpus=1, max_retries=3)(fill_shard)
        blob = ray.put(trained)
        return ray.get([task.remote(blob, shard, 1) for shard in shards])
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    # spawn, not fork: a forked copy of a process that has run OpenMP can hang in its first parallel region
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(fill_shard, [trained] * len(shards), shards, [threads] * len(shards)))


def merge_on_disk(trained_index, shards: list[Shard], lists_path: Path):
    """A copy of the trained index holding every shard's lists in one on-disk file at `lists_path`."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.deserialize_index(faiss.serialize_index(trained_index))
    with stdout_to_stderr():
        merge_ondisk(index, [str(s.path) for s in shards], str(lists_path))
    return index


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints to stdout (FAISS's on-disk lists report each resize there) to stderr, so that the
    command's own output stays clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def build_on_disk(trained_index, shards: list[Shard], lists_path: Path, engine: str = "local",
                  workers: int | None = None):
    """Fill the shards and merge them into an index whose lists live in `lists_path`; the shard files are removed."""
    if problem := on_disk_problem(trained_index):
        raise IndexerError(f"this index cannot be built in shards: {problem}")
    workers = workers or max(1, min(len(shards), os.cpu_count() or 1))
    try:
        counts = fill_shards(trained_index, shards, engine, workers)
        index = merge_on_disk(trained_index, shards, lists_path)
    finally:
        for shard in shards:
            shard.path.unlink(missing_ok=True)
    if index.ntotal != sum(counts):
        raise IndexerError(f"the merged index holds {index.ntotal} vectors, its shards {sum(counts)}")
    return index


def lists_file(index) -> str:
    """The file an on-disk index's lists live in."""
    import faiss

    return faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename


def rename_lists(index, name: str) -> None:
    """Record `name` as the file an on-disk index's lists live in (after the file was renamed)."""
    import faiss

    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename = name


def is_on_disk(index) -> bool:
    import faiss

    try:
        return isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists),
                          faiss.OnDiskInvertedLists)
    except RuntimeError:
        return False
