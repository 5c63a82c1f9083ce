"""`retrieval index build --shards N`: the store's live rows split into N ranges of row ids, each added to a copy of
the trained IVF index by its own process or Ray task, merged into one on-disk index (indexers.shards)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexers.shards import Shard, build_on_disk
from retrieval.files import temporary_name
from retrieval.store import EmbeddingStore


@dataclass(frozen=True)
class StoreRows:
    """The live (row ids, vectors) of one store version with lo ≤ row < hi: picklable, for a worker."""

    store: str
    version: int
    lo: int
    hi: int

    def __call__(self):
        return EmbeddingStore(self.store, version=self.version).iter_batches(between=(self.lo, self.hi))


def row_ranges(live: np.ndarray, shards: int) -> list[tuple[int, int]]:
    """`shards` ranges of row ids [lo, hi) with near-equal counts of the given live rows (ascending)."""
    cuts = [int(live[i * len(live) // shards]) for i in range(1, shards)]
    return list(zip([0, *cuts], [*cuts, int(live[-1]) + 1]))


def sharded_fill(store: EmbeddingStore, out: Path, shards: int, engine: str, ray_address: str | None):
    """A `fill` for indexers.build.build_index: the trained index filled in `shards` shards, merged on disk into a
    temporary lists file in `out` (index_folder.write_index_files names it once the build commits)."""
    def fill(trained_index):
        if engine == "ray":
            from retrieval.ray_cluster import connect

            connect(ray_address)
        ranges = row_ranges(store.live_rows(), shards)
        parts = [Shard(StoreRows(str(store.path.resolve()), store.version, lo, hi),
                       out / temporary_name(f"shard-{i}.faiss")) for i, (lo, hi) in enumerate(ranges)]
        return build_on_disk(trained_index, parts, out / temporary_name("lists.ivfdata"), engine)
    return fill
