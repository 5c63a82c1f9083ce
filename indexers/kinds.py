"""What the code knows about each kind of FAISS index, in one table keyed by kind.

For each kind: which factory keys and which FAISS class it is, the knobs that trade speed for recall and the
range tuning searches, the search parameters that carry an id selector, whether it has a GPU version, whether it
keeps ids itself (else it is wrapped in IDMap2) and its bytes per vector. Adding a kind is an entry here and,
for `auto`, a candidate in choose.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Knob = tuple[str, int, int]
ID_MAP_BYTES = 16  # IDMap2: the id array plus the reverse hash map
IVF_ID_BYTES = 8  # an IVF list stores each vector's id beside its code
MAX_EF_SEARCH = 4096
MAX_K_FACTOR = 64  # a refined index re-ranks k · k_factor candidates exactly


def code_bytes(key: str, dim: int) -> float:
    """Bytes of one vector's code under the key's encoding: PQm (8 bits) or PQmxb, SQ8, else float32."""
    pq = re.search(r"(^|,)PQ(\d+)(?:x(\d+))?", key)
    if pq:
        return math.ceil(int(pq.group(2)) * int(pq.group(3) or 8) / 8)
    return dim if re.search(r"(^|,|_)SQ8(,|$)", key) else 4 * dim


@dataclass(frozen=True)
class IndexKind:
    name: str
    key: str  # regex a factory key of this kind matches (tried in table order)
    faiss_class: str  # the class of the index inside IDMap2 (tried in table order)
    native_ids: bool  # add_with_ids keeps the row ids without an IDMap2
    gpu: bool  # has a classic GPU implementation (index_cpu_to_gpu)
    vector_bytes: Callable[[str, int], float]  # (key, dim) -> resident bytes per vector, before any IDMap2
    # (inner index, k) -> the knobs that trade speed for recall, in tuning order: (name, lowest, highest)
    knobs: Callable[[Any, int], list[Knob]] = lambda inner, k: []
    selector: Callable[[Any, Any, dict[str, str]], Any] | None = None  # (faiss, selector, knobs) -> params
    selector_under_idmap: bool = True  # the selector's params keep their knob when IDMap2 translates ids


def _refine_bytes(key: str, dim: int) -> float:
    """The base index's bytes plus the refine stage's own copy of each vector (Refine(SQ8): d, Refine(Flat): 4d)."""
    base, refine = re.fullmatch(r"(.*),Refine\((.*)\)", key).groups()
    return kind_of_key(base).vector_bytes(base, dim) + code_bytes(refine, dim)


def _ivf_knobs(inner, k: int) -> list[Knob]:
    """nprobe, and the efSearch of an HNSW coarse quantiser, which decides which lists nprobe finds."""
    import faiss

    hnsw = isinstance(faiss.downcast_index(inner.quantizer), faiss.IndexHNSW)
    return [("nprobe", 1, inner.nlist), *([("quantizer_efSearch", 16, MAX_EF_SEARCH)] if hnsw else [])]


def _refine_knobs(inner, k: int) -> list[Knob]:
    """The base index's knob first (tuned with k_factor at its highest), then k_factor."""
    import faiss

    base = faiss.downcast_index(inner.base_index)
    return [*kind_of_inner(base).knobs(base, k), ("k_factor_rf", 1, MAX_K_FACTOR)]


KINDS: list[IndexKind] = [
    IndexKind("refine", r".*,Refine\(.*\)", "IndexRefine", native_ids=False, gpu=False, vector_bytes=_refine_bytes,
              knobs=_refine_knobs),
    IndexKind("flat", r"Flat", "IndexFlat", native_ids=False, gpu=True, vector_bytes=lambda key, dim: 4 * dim,
              selector=lambda faiss, sel, knobs: faiss.SearchParameters(sel=sel)),
    IndexKind("hnsw", r"HNSW\d+.*", "IndexHNSW", native_ids=False, gpu=False,
              vector_bytes=lambda key, dim: code_bytes(key, dim) + 2 * int(re.match(r"HNSW(\d+)", key).group(1)) * 4,
              knobs=lambda inner, k: [("efSearch", k, MAX_EF_SEARCH)],
              selector=lambda faiss, sel, knobs: faiss.SearchParametersHNSW(
                  sel=sel, efSearch=int(knobs.get("efSearch", 64)))),
    IndexKind("ivf-fastscan", r"IVF\d+.*,PQ\d+x4fs.*", "IndexIVFPQFastScan", native_ids=True, gpu=False,
              vector_bytes=lambda key, dim: code_bytes(key, dim) + IVF_ID_BYTES,
              knobs=_ivf_knobs,
              selector=lambda faiss, sel, knobs: faiss.SearchParametersIVF(
                  sel=sel, nprobe=int(knobs.get("nprobe", 1))), selector_under_idmap=False),
    IndexKind("ivf", r"IVF\d+.*", "IndexIVF", native_ids=True, gpu=True,
              vector_bytes=lambda key, dim: code_bytes(key, dim) + IVF_ID_BYTES,
              knobs=_ivf_knobs,
              selector=lambda faiss, sel, knobs: faiss.SearchParametersIVF(
                  sel=sel, nprobe=int(knobs.get("nprobe", 1))), selector_under_idmap=False),
]
OTHER = IndexKind("other", r".*", "Index", native_ids=False, gpu=False, vector_bytes=code_bytes)


IVF_KEY = re.compile(r"(^|,)IVF(\d+)(?:_HNSW(\d+))?")  # a key's IVF part: its list count, an HNSW quantiser's M


def ivf_lists(key: str) -> int:
    """The IVF list count a factory key names (1 for a key without IVF)."""
    found = IVF_KEY.search(key)
    return int(found.group(2)) if found else 1


def kind_of_key(key: str) -> IndexKind:
    """The kind a factory key builds."""
    return next((kind for kind in KINDS if re.fullmatch(kind.key, key)), OTHER)


def unwrap(index):
    """The index inside the IDMap2 that keys it by row ids, as its own class."""
    import faiss

    return faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap2) else index)


def kind_of_inner(inner) -> IndexKind:
    import faiss

    return next((kind for kind in KINDS if isinstance(inner, getattr(faiss, kind.faiss_class))), OTHER)


def kind_of(index) -> IndexKind:
    """The kind of a built index (IDMap2 looked through)."""
    return kind_of_inner(unwrap(index))


def factory_string(key: str) -> str:
    """The key as FAISS builds it: kinds that keep ids natively as they are, others inside IDMap2."""
    return key if kind_of_key(key).native_ids else f"IDMap2,{key}"


def estimate_bytes(key: str, n: int, dim: int) -> int:
    """Rough resident size of an index built with `key` (autofaiss-style estimates): vectors, their ids, IVF
    centroids."""
    ivf = IVF_KEY.search(key)
    coarse = int(ivf.group(2)) * (dim * 4 + 2 * int(ivf.group(3) or 0) * 4) if ivf else 0  # centroids, their graph
    ids = 0 if kind_of_key(key).native_ids else ID_MAP_BYTES
    return int(n * (kind_of_key(key).vector_bytes(key, dim) + ids)) + coarse


def tuning(index, k: int) -> list[Knob]:
    """The knobs of a built index, in tuning order: (name, lowest, highest)."""
    inner = unwrap(index)
    return kind_of_inner(inner).knobs(inner, k)


def selector_params(index, selector, search_params: str | None):
    """faiss SearchParameters carrying an id selector plus the tuned knob, or None if the kind takes none."""
    import faiss

    kind = kind_of(index)
    if kind.selector is None or (isinstance(index, faiss.IndexIDMap2) and not kind.selector_under_idmap):
        return None
    knobs = dict(p.split("=") for p in search_params.split(",")) if search_params else {}
    return kind.selector(faiss, selector, knobs)


def supports_gpu(index) -> bool:
    """Whether the index's kind has a classic GPU implementation (HNSW, fast-scan and refine have none), and the
    index is in RAM (an on-disk index's lists would all be copied to the GPU)."""
    from indexers.shards import is_on_disk

    return kind_of(index).gpu and not is_on_disk(index)
