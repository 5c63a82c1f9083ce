"""The automatic index by measurement: every candidate the memory budget allows is built on a sample of the
vectors, tuned to the target recall on held-out sample queries, and timed; the winner is the fastest at that
recall (`goal` "latency"), the smallest ("memory") or the quickest to build ("build").

The sample stands for the whole store: IVF keys are built with the list count `nlist_for` gives the sample, so
lists hold as many vectors as they will at full size relative to √n, and the full-size build time is the
sample's, scaled as k-means and adding grow (`full_build_seconds`). What was tried, with its recall, QPS and
build seconds, goes into index.json.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from indexers.build import faiss_errors, training_points, tune
from indexers.choose import IndexChoice, candidates, nlist_for
from indexers.errors import IndexerError
from indexers.ground_truth import TRUTH_MARGIN, exact_search, reaches, rescorer
from indexers.kinds import IVF_KEY, factory_string, ivf_lists

SAMPLE = 50_000  # vectors the candidates are built on
SAMPLE_QUERIES = 500  # of them, held out as the tuning and timing queries
GOALS = ("latency", "memory", "build")
MIN_SECONDS = 0.3  # a timing repeats the batch search until this long has passed


@dataclass(frozen=True)
class Trial:
    key: str  # the full-size key
    sample_key: str  # as built on the sample
    params: str  # tuned on the sample
    recall: float  # exact-rescored recall@k on the sample queries at `params`
    qps: float  # batch search of the sample queries, best of two timings
    build_seconds: float  # the sample's train + add, scaled to the full size
    bytes: int  # estimated at full size
    error: str = ""  # why it could not be measured (then it is never chosen)
    recall_error: float = 0.0  # the standard error of `recall` over the sample queries

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Selection:
    choice: IndexChoice
    trials: list[Trial]


def timed_search(index, queries: np.ndarray, k: int, min_seconds: float | None = None, max_runs: int = 20
                 ) -> tuple[float, np.ndarray, np.ndarray]:
    """QPS of batch search over all queries after a warm-up, repeated until `min_seconds` (default MIN_SECONDS)
    have passed."""
    min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
    index.search(queries[:100], k)
    runs, elapsed = 0, 0.0
    while runs == 0 or (elapsed < min_seconds and runs < max_runs):
        start = time.perf_counter()
        scores, ids = index.search(queries, k)
        elapsed += time.perf_counter() - start
        runs += 1
    return runs * len(queries) / elapsed, scores, ids


def sample_key(key: str, m: int) -> str:
    """`key` for a sample of m vectors: the IVF list count the sample would get."""
    return IVF_KEY.sub(lambda match: match.group(0).replace(f"IVF{match.group(2)}", f"IVF{nlist_for(m)}"), key)


def check_goal(goal: str) -> None:
    if goal not in GOALS:
        raise IndexerError(f"--optimize must be one of {', '.join(GOALS)}, not {goal!r}")


def pick(trials: list[Trial], target: float, goal: str = "latency") -> tuple[Trial, str]:
    """The winner among measured trials, and why: of those reaching `target` (with 95 % confidence), the fastest,
    smallest or quickest to build; when none does, the one with the highest recall."""
    check_goal(goal)
    reaching = [t for t in trials if reaches(t.recall, t.recall_error, target) and not t.error]
    if not reaching:
        measured = [t for t in trials if not t.error]
        if not measured:
            raise IndexerError("no candidate index could be built on the sample: "
                               + "; ".join(f"{t.key}: {t.error}" for t in trials))
        best = max(measured, key=lambda t: t.recall)
        return best, f"no candidate reached recall {target} on the sample; {best.key} came closest ({best.recall:.3f})"
    order = {"latency": lambda t: (-t.qps, t.bytes), "memory": lambda t: (t.bytes, -t.qps),
             "build": lambda t: (t.build_seconds, -t.qps)}[goal]
    best = min(reaching, key=order)
    measure = {"latency": f"{best.qps:,.0f} QPS", "memory": f"{best.bytes / 2**20:,.0f} MiB",
               "build": f"about {best.build_seconds:.0f} s to build"}[goal]
    others = len(reaching) - 1
    return best, (f"{best.key}: {measure} at recall {best.recall:.3f} ({best.params or 'exact'}) on a "
                  f"sample, the best of {others + 1} candidates reaching {target}"
                  + (f" ({len(trials) - len(reaching)} more did not)" if len(trials) > len(reaching) else ""))


def select_index(sample: np.ndarray, n: int, dim: int, memory_budget: int, target: float, k: int = 10,
                 goal: str = "latency", gpu: bool = False) -> Selection:
    """Measure the candidates on `sample` (vectors of the store, at most SAMPLE are used) and pick one."""
    check_goal(goal)
    options = candidates(n, dim, memory_budget, gpu)
    if len(options) == 1 or gpu:  # nothing to choose, or timings on this CPU would not speak for the GPU
        return Selection(options[0], [])
    sample = np.asarray(sample[:SAMPLE], dtype=np.float32)
    sample = sample[np.random.default_rng(0).permutation(len(sample))]  # queries from all over, not its first rows
    held = min(SAMPLE_QUERIES, len(sample) // 10)
    queries, base = np.ascontiguousarray(sample[:held]), np.ascontiguousarray(sample[held:])
    ids = np.arange(len(base), dtype=np.int64)

    def batches():
        yield ids, base

    truth = exact_search(queries, batches, k + TRUTH_MARGIN)
    rescore = rescorer(queries, batches)
    trials = []
    for option in options:
        try:
            trials.append(_trial(option, base, queries, truth, rescore, n, k, target))
        except IndexerError as e:  # FAISS refused this one on the sample (too few points to train it): the rest
            trials.append(Trial(option.key, sample_key(option.key, len(base)), "", 0.0, 0.0, 0.0, option.bytes,
                                str(e)))
    best, why = pick(trials, target, goal)
    chosen = next(option for option in options if option.key == best.key)
    return Selection(IndexChoice(chosen.key, chosen.bytes, why), trials)


def full_build_seconds(key: str, built_key: str, train: float, add: float, m: int, n: int) -> float:
    """The sample's train and add seconds, scaled to n vectors: k-means work grows with lists × training points,
    adding with the vectors × the lists each is compared with (an HNSW graph: × log n per insertion)."""
    lists, sample_lists = ivf_lists(key), ivf_lists(built_key)
    train *= (lists * training_points(n, lists)) / (sample_lists * training_points(m, sample_lists))
    add *= n / m * (lists / sample_lists if "_HNSW" not in key else 1.0)
    if key.startswith("HNSW") or "_HNSW" in key:
        add *= math.log(n) / math.log(m)
    return train + add


def _trial(option: IndexChoice, base: np.ndarray, queries: np.ndarray, truth, rescore, n: int, k: int,
           target: float) -> Trial:
    import faiss

    key = sample_key(option.key, len(base))
    with faiss_errors(key):
        index = faiss.index_factory(base.shape[1], factory_string(key), faiss.METRIC_INNER_PRODUCT)
        start = time.perf_counter()
        if not index.is_trained:  # as build_index trains it, on as many points for the sample's lists
            pick_rows = np.random.default_rng(0).permutation(len(base))[:training_points(len(base), ivf_lists(key))]
            index.train(base[np.sort(pick_rows)])
        trained = time.perf_counter()
        index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
        added = time.perf_counter()
        params, recall = tune(index, queries, truth, k, target, rescore)
        qps = max(timed_search(index, queries, k)[0] for _ in range(2))
    build = full_build_seconds(option.key, key, trained - start, added - trained, len(base), n)
    return Trial(option.key, key, params, recall.fair, qps, build, option.bytes, recall_error=recall.error)
