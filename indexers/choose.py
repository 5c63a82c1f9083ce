"""Choosing a FAISS index for a vector count, dimension and memory budget (the `auto` index key)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from indexers.errors import IndexerError
from indexers.kinds import estimate_bytes

EXACT_MAX = 50_000  # below this, exact search costs at most a few ms a query: no reason to approximate
# HNSW is built only while its build (no training, but graph insertion costs ~ n·dim) stays well inside the
# 2-minute budget on 2 cores: HNSW32 over 1M × 256 took 94-153 s to add (`retrieval bench index`), so we stop
# at half that work, 2^27 = 512Ki × 256 (about 170k vectors at 768 dims).
HNSW_MAX_WORK = 2**27  # n · dim
HNSW_M = 32


@dataclass(frozen=True)
class IndexChoice:
    key: str
    bytes: int
    reason: str


def parse_memory(text: str) -> int:
    """'4GB', '512MB', '1.5GiB', '800M' → bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise IndexerError(f"cannot read memory size {text!r}: write it like 4GB or 512MB")
    power = " KMGT".index(m.group(2).upper() or " ")
    size = int(float(m.group(1)) * 1024**power)
    if size <= 0:
        raise IndexerError(f"memory size {text!r} must be more than 0")
    return size


def hnsw_max(dim: int) -> int:
    """The largest vector count for which `auto` still builds an HNSW graph at this dimension."""
    return HNSW_MAX_WORK // max(dim, 1)


def nlist_for(n: int) -> int:
    """A power of two near 4·√n, small enough that k-means has ≥ 39 training points per centroid."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(n), 1)))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return max(nlist, 1)


def pq_m_for(dim: int) -> int:
    """The largest sub-quantizer count that divides dim and keeps ≥ 2 dims per sub-vector."""
    for m in (128, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1):
        if dim % m == 0 and dim // m >= 2:
            return m
    return 1


def candidates(n: int, dim: int, memory_budget: int, gpu: bool = False) -> list[IndexChoice]:
    """The keys `auto` considers at full size, in the order of the fallback ladder, that fit `memory_budget`.

    Exact search alone up to EXACT_MAX vectors (and on a GPU) while it fits; otherwise HNSW with flat or SQ8 storage
    while its graph builds fast (n · dim ≤ HNSW_MAX_WORK), IVF-SQ8, IVF-SQ8 with an HNSW coarse quantiser (for
    many lists), IVF-PQ fast-scan refined by SQ8; IVF-PQ fast-scan alone, the most compressed, only where none of
    these fits. select.py
    measures them on a sample; `choose_index` takes the first.
    """
    if n <= 0:
        raise IndexerError("cannot build an index over an empty store")
    nlist, m = nlist_for(n), pq_m_for(dim)
    exact = IndexChoice("Flat", estimate_bytes("Flat", n, dim), f"exact search: {n} vectors"
                        + (" on the GPU" if gpu else ""))
    if (n <= EXACT_MAX or gpu) and exact.bytes <= memory_budget:
        return [exact]
    ladder = []
    if EXACT_MAX < n <= hnsw_max(dim) and not gpu:
        ladder += [(f"HNSW{HNSW_M}", "HNSW graph over the vectors, no training"),
                   (f"HNSW{HNSW_M}_SQ8", "HNSW graph over 8-bit scalar-quantised vectors")]
    ladder.append((f"IVF{nlist},SQ8", f"inverted lists over {nlist} clusters, 8-bit scalar-quantised vectors"))
    if nlist >= 1024 and not gpu:
        ladder.append((f"IVF{nlist}_HNSW{HNSW_M},SQ8", f"the same with an HNSW graph over the {nlist} centroids"))
    if not gpu:
        ladder.append((f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)", "PQ fast-scan codes, re-ranked by 8-bit vectors"))
    fits = [IndexChoice(key, estimate_bytes(key, n, dim), reason) for key, reason in ladder
            if estimate_bytes(key, n, dim) <= memory_budget]
    if not fits:  # PQ codes alone rarely reach a high recall: the last resort, where nothing else fits
        key = f"IVF{nlist},PQ{m}x4fs"
        fits = [IndexChoice(key, estimate_bytes(key, n, dim), "PQ fast-scan codes only: the most compressed")]
    if fits[0].bytes > memory_budget:
        smallest = fits[0].bytes
        raise IndexerError(f"memory budget of {memory_budget / 2**20:.0f} MiB is too small for {n} vectors of "
                           f"dimension {dim}: the most compressed index needs about {smallest / 2**20:.0f} MiB")
    return fits


def choose_index(n: int, dim: int, memory_budget: int, gpu: bool = False) -> IndexChoice:
    """The first candidate the budget allows, unmeasured: exact for small stores; HNSW while it builds fast;
    then IVF-SQ8, or IVF-PQ when memory demands (select.py measures instead, where there is a choice: at 1M × 256
    on 2 cores, 2026-12-02, it picked IVF4096,PQ128x4fs,Refine(SQ8), which searched 2.3-2.9× faster than HNSW32
    at recall@10 ≥ 0.95 and built in 54-56 s against 130 s)."""
    return candidates(n, dim, memory_budget, gpu)[0]


def sharded_choice(n: int, dim: int) -> IndexChoice:
    """The `auto` key of a sharded build, whose lists live on disk: the ladder's first IVF kind, 8-bit scalar-
    quantised codes (the fast-scan and refined kinds cannot keep their lists on disk)."""
    nlist = nlist_for(n)
    key = f"IVF{nlist}_HNSW{HNSW_M},SQ8" if nlist >= 1024 else f"IVF{nlist},SQ8"
    return IndexChoice(key, estimate_bytes(key, n, dim), f"sharded on disk: inverted lists over {nlist} clusters, "
                       "8-bit scalar-quantised vectors")
