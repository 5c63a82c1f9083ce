"""Building a FAISS index: train on a capped sample, add ids and vectors in streamed batches, tune, measure."""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from indexers.errors import IndexerError
from indexers.gpu import resolve_faiss_device, to_cpu, to_gpu
from indexers.ground_truth import TRUTH_MARGIN, Batches, Recall, Rescore, exact_search, recall_at_k, rescorer
from indexers.kinds import Knob, factory_string, tuning

TRAIN_POINTS_PER_LIST = 39  # the least FAISS trains k-means on without a warning; more only costs build time
MAX_TRAIN = 256_000
Fill = Callable[[object], object]  # a trained (CPU) index → the index filled with every row


@dataclass
class BuiltIndex:
    index: object  # a CPU faiss.Index whose ids are the store's row ids
    key: str
    factory: str
    params: str
    recall: Recall  # on the held-out tuning queries, exact-rescored (`fair`) and plain
    recall_queries: int
    device: str
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


MAX_LISTS = 1 << 24  # IVF lists
MAX_KEY_NUMBER = 4096  # any other number: graph degree, dimensions, sub-quantizers, bits


def check_index_key(key: str) -> None:
    """Refuse a key FAISS would abort the whole process on (its assertions are not exceptions), hang on or
    exhaust memory with, before it is handed to FAISS."""
    if not key or not re.fullmatch(r"[A-Za-z0-9_,()]+", key):
        raise IndexerError(f"--index-key {key!r} is not a FAISS factory string (e.g. Flat, HNSW32, IVF1024,SQ8)")
    if "IDMap" in key:
        raise IndexerError("--index-key names the index alone: retrieval keys it by row ids itself (drop IDMap)")
    for name, number in re.findall(r"([A-Za-z]*)(\d+)", key):  # every number, with the letters before it
        value = int(number)
        low, high = {"IVF": (1, MAX_LISTS), "HNSW": (2, 512), "NSG": (2, 512)}.get(name, (1, MAX_KEY_NUMBER))
        if not low <= value <= high:
            raise IndexerError(f"--index-key {key!r}: {name}{number} is out of range ({low} to {high})")


@contextlib.contextmanager
def faiss_errors(key: str) -> Iterator[None]:
    """FAISS's refusals of a key (raised while building, training, adding or searching) as one clear error."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise IndexerError(f"FAISS cannot build index key {key!r}: {reason.split('Error: ')[-1]}") from None


def training_points(n: int, lists: int) -> int:
    """How many vectors an index with `lists` IVF lists (1 for none) is trained on, out of n."""
    return min(n, MAX_TRAIN, max(TRAIN_POINTS_PER_LIST * lists, 10_000))


def tune(index, queries: np.ndarray, truth: tuple[np.ndarray, np.ndarray], k: int, target: float,
         rescore: Rescore | None = None, skip: np.ndarray | None = None) -> tuple[str, Recall]:
    """The cheapest setting of the index's knobs whose exact-rescored k-recall@k on the sample reaches `target`
    with 95 % confidence (the sample's recall less 1.645 standard errors: new queries should get the target too).

    One knob: its smallest value that reaches the target (doubling from the lowest, then bisection between the
    last value short of it and the first that reaches it; the highest where none does). Two (a refined index's
    base knob and k_factor_rf; an IVF's nprobe and its HNSW quantiser's efSearch): the first knob's smallest
    value with the second at its highest, and 1.5, 2 and 4 times that, each with the second's smallest value
    that reaches the target; of these pairs the one that searches fastest, since one knob at its minimum can force
    the other to a costly corner. Any further knob is then minimised on its own.
    `skip`: row ids the index holds that the searches pass by (the queries themselves, where they are in it).
    """
    import faiss

    space = faiss.ParameterSpace()
    knobs = tuning(index, k)
    measured: dict[str, Recall] = {}

    def params_of(values: dict[str, int]) -> str:
        return ",".join(f"{name}={value}" for name, value in values.items())

    def recall_with(values: dict[str, int]) -> Recall:
        params = params_of(values)
        if params not in measured:
            if params:
                space.set_index_parameters(index, params)
            measured[params] = measure(index, queries, truth, k, rescore, skip, params)
        return measured[params]

    def least(values: dict[str, int], knob: Knob) -> int:
        name, low, high = knob
        return smallest(lambda value: recall_with(values | {name: value}).reaches(target), low, high)

    chosen = {name: high for name, _, high in knobs}
    if knobs:
        first = knobs[0]
        chosen[first[0]] = least(chosen, first)
    if len(knobs) > 1:
        (name, _, high), second = first, knobs[1]
        pairs = []
        for value in sorted({chosen[name], *(min(high, math.ceil(f * chosen[name])) for f in (1.5, 2, 4))}):
            at = chosen | {name: value}
            pairs.append(at | {second[0]: least(at, second)})
        reaching = [p for p in pairs if recall_with(p).reaches(target)]
        reaching = reaching or [max(pairs, key=lambda p: recall_with(p).fair)]
        chosen = min(reaching, key=lambda p: search_seconds(index, space, params_of(p), queries, k))
    for knob in knobs[2:]:
        chosen[knob[0]] = least(chosen, knob)
    recall = recall_with(chosen)
    if chosen:
        space.set_index_parameters(index, params_of(chosen))
    return params_of(chosen), recall


def search_seconds(index, space, params: str, queries: np.ndarray, k: int) -> float:
    """The best of two timings of one batch search of `queries` at `params`."""
    space.set_index_parameters(index, params)
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        index.search(queries, k)
        timings.append(time.perf_counter() - start)
    return min(timings)


def smallest(reaches: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest integer in [low, high] for which `reaches` holds (assumed monotone), else `high`."""
    short, value = None, low
    while not reaches(value):
        if value >= high:
            return high
        short, value = value, min(2 * value, high)
    while short is not None and value - short > 1:
        middle = (short + value) // 2
        short, value = (short, middle) if reaches(middle) else (middle, value)
    return value


def measure(index, queries: np.ndarray, truth: tuple[np.ndarray, np.ndarray], k: int,
            rescore: Rescore | None = None, skip: np.ndarray | None = None, params: str = "") -> Recall:
    if skip is not None:
        import faiss

        from indexers.kinds import selector_params

        search = selector_params(index, faiss.IDSelectorNot(faiss.IDSelectorBatch(skip)), params)
        _, ids = index.search(queries, k, params=search)
    else:
        _, ids = index.search(queries, k)
    return recall_at_k(ids, truth[1], truth[0], k, rescore)


def held_out(batches: Batches, rows: np.ndarray) -> Batches:
    """The same batches without `rows`."""
    def others():
        for ids, vectors in batches():
            keep = ~np.isin(ids, rows)
            yield ids[keep], vectors[keep]
    return others


def build_index(batches: Batches, n: int, dim: int, key: str, sample_vectors: Callable[[int], np.ndarray],
                recall_queries: np.ndarray, recall_rows: np.ndarray, device: str = "auto",
                target_recall: float = 0.95, k: int = 10, progress: bool = True,
                fill: Fill | None = None) -> BuiltIndex:
    """Build `key` over `n` vectors streamed by `batches`, tuned to reach `target_recall` k-recall@k.

    The tuning queries are stored vectors (`recall_rows`), held out of the index until tuning is done:
    a vector that is already in the index finds itself and its neighbourhood too easily, which overstates
    the recall a new query gets (by 0.01-0.03 at 1M vectors). At most a tenth of the store is held out.
    `fill`, if given, fills the trained (CPU) index with every row and returns it (in shards: indexers.shards);
    the held-out rows are then passed by with an id selector while tuning, which for an IVF index is the same as
    their absence. By default the rows are streamed in here.
    """
    notes: list[str] = []
    check_index_key(key)
    factory = factory_string(key)
    with faiss_errors(key):
        return _build(batches, n, dim, key, factory, sample_vectors, recall_queries, recall_rows, device,
                      target_recall, k, progress, notes, fill)


def _build(batches: Batches, n: int, dim: int, key: str, factory: str, sample_vectors: Callable[[int], np.ndarray],
           recall_queries: np.ndarray, recall_rows: np.ndarray, device: str, target_recall: float, k: int,
           progress: bool, notes: list[str], fill: Fill | None) -> BuiltIndex:
    import faiss
    from tqdm import tqdm

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    device = resolve_faiss_device(device, notes)
    if device == "cuda":
        index, device = to_gpu(index, notes)
    seconds: dict[str, float] = {}
    if n >= 10:
        pick = np.unique(np.linspace(0, len(recall_rows) - 1, min(len(recall_rows), n // 10)).astype(int))
        rows = np.asarray(recall_rows, dtype=np.int64)[pick]
        queries = np.ascontiguousarray(np.asarray(recall_queries)[pick], dtype=np.float32)
    else:  # too few to hold any out: tune on stored vectors in place
        rows = np.zeros(0, np.int64)
        queries = np.ascontiguousarray(recall_queries, dtype=np.float32)
    others = held_out(batches, rows)

    t = time.perf_counter()
    if not index.is_trained:
        try:
            lists = faiss.extract_index_ivf(index).nlist
        except RuntimeError:  # trained, but not an IVF (PQ, LSH, OPQ before a flat index)
            lists = 1
        want = training_points(n, lists)
        if want < lists:
            raise IndexerError(f"{n} vectors are too few to train {lists} clusters; use a smaller IVF")
        index.train(np.ascontiguousarray(sample_vectors(want), dtype=np.float32))
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    if fill is not None:
        index = fill(to_cpu(index))
    else:
        with tqdm(total=n - len(rows), unit="vec", desc=f"add {key}", disable=not progress,
                  dynamic_ncols=True) as bar:
            for ids, vectors in others():
                index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
                bar.update(len(ids))
        index = to_cpu(index)
    seconds["add"] = time.perf_counter() - t

    t = time.perf_counter()
    truth = exact_search(queries, others, k + TRUTH_MARGIN)
    params, recall = tune(index, queries, truth, k, target_recall, rescorer(queries, others),
                          skip=rows if fill is not None else None)
    seconds["tune"] = time.perf_counter() - t
    if len(rows) and fill is None:
        index.add_with_ids(queries, rows)
    if index.ntotal != n:
        raise IndexerError(f"index holds {index.ntotal} vectors but the store has {n}")
    return BuiltIndex(index=index, key=key, factory=factory, params=params, recall=recall,
                      recall_queries=len(queries), device=device, seconds=seconds, notes=notes)
