"""The `indexers` package on synthetic vectors: choosing an index, exact ground truth, building and tuning.

No models here: low-rank unit vectors (z @ W + noise) stand in for embeddings, because on isotropic random
vectors every neighbour is about as far as every other and ANN recall means nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from indexers.build import build_index, smallest, tune
from indexers.choose import EXACT_MAX, choose_index, hnsw_max, nlist_for, parse_memory, pq_m_for
from indexers.errors import IndexerError
from indexers.gpu import faiss_gpu_count
from indexers.ground_truth import Recall, exact_search, recall_at_k, rescorer
from indexers.kinds import (
    estimate_bytes,
    factory_string,
    kind_of,
    kind_of_key,
    selector_params,
    supports_gpu,
    tuning,
)

faiss = pytest.importorskip("faiss")

GiB, MiB = 2**30, 2**20


def low_rank(n: int, dim: int = 64, rank: int = 16, noise: float = 0.1, seed: int = 0,
             basis: np.ndarray | None = None) -> np.ndarray:
    """n unit vectors near a rank-`rank` subspace (the same subspace for the same `basis`)."""
    rng = np.random.default_rng(seed)
    w = basis if basis is not None else np.random.default_rng(1234).standard_normal((rank, dim))
    x = rng.standard_normal((n, rank)) @ w + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def batches_of(ids: np.ndarray, vectors: np.ndarray, sizes: list[int] | int):
    """A re-iterable `Batches` callable over (ids, vectors), cut at the given batch sizes."""
    if isinstance(sizes, int):
        sizes = [sizes] * math.ceil(len(ids) / sizes)
    cuts = np.cumsum([0, *sizes])
    assert cuts[-1] >= len(ids)

    def batches():
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if lo < len(ids):
                yield ids[lo:hi], vectors[lo:hi]

    return batches


def brute_force(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int):
    scores = queries @ vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, axis=1), ids[top]


# ---------------------------------------------------------------------------------------------- choosing


@pytest.mark.parametrize("text, expected", [
    ("4GB", 4 * GiB),
    ("512MB", 512 * MiB),
    ("1.5GiB", int(1.5 * GiB)),
    ("800M", 800 * MiB),
    ("4 gb", 4 * GiB),
    ("2T", 2 * 1024 * GiB),
    ("64KiB", 64 * 1024),
    ("1000", 1000),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "four GB", "4XB", "-1GB", "4 GB RAM", "1e9", "4GBB"])
def test_parse_memory_rejects_bad_text(text):
    with pytest.raises(IndexerError, match="cannot read memory size"):
        parse_memory(text)


@pytest.mark.parametrize("n", [1, 10, 38, 39, 77, 78, 100, 1_000, 5_000, 12_345, 100_000, 1_000_000, 50_000_000])
def test_nlist_for_keeps_39_training_points_per_list(n):
    nlist = nlist_for(n)
    assert nlist >= 1 and nlist & (nlist - 1) == 0, "a power of two"
    assert nlist == 1 or n >= 39 * nlist
    # not needlessly small either: near 4·√n unless the 39-point rule caps it
    assert nlist >= min(4 * math.sqrt(n) / 2, n / 39 / 2) or nlist == 1


def test_choose_index_by_size():
    budget = parse_memory("64GB")
    small = choose_index(1_000, 64, budget)
    assert small.key == "Flat" and "exact" in small.reason
    assert choose_index(EXACT_MAX, 768, budget).key == "Flat"
    assert choose_index(EXACT_MAX + 1, 768, budget).key == "HNSW32"
    assert choose_index(hnsw_max(768), 768, budget).key == "HNSW32"
    big = choose_index(hnsw_max(768) + 1, 768, budget)
    assert big.key == f"IVF{nlist_for(hnsw_max(768) + 1)},SQ8"
    huge = choose_index(20_000_000, 768, budget)
    assert huge.key == f"IVF{nlist_for(20_000_000)},SQ8"
    # HNSW's range shrinks as the dimension grows (its build costs ~ n·dim); the 1M × 256 bar is past it
    assert hnsw_max(256) > hnsw_max(768) and choose_index(1_000_000, 256, budget).key == "IVF4096,SQ8"
    # on the GPU exact search stays the choice far beyond EXACT_MAX, and HNSW (CPU only) never comes up
    assert choose_index(5 * EXACT_MAX, 768, budget, gpu=True).key == "Flat"
    assert not choose_index(20_000_000, 768, parse_memory("16GB"), gpu=True).key.startswith("HNSW")


def test_choose_index_compresses_when_memory_is_tight():
    n, dim = 2_000_000, 768
    roomy = choose_index(n, dim, parse_memory("16GB"))
    tight = choose_index(n, dim, parse_memory("1GB"))
    assert roomy.key.endswith(",SQ8")
    assert "PQ" in tight.key and "Refine" not in tight.key
    for choice, budget in ((roomy, "16GB"), (tight, "1GB")):
        assert choice.bytes == estimate_bytes(choice.key, n, dim) <= parse_memory(budget)
        assert choice.key.startswith(f"IVF{nlist_for(n)},")
        # every key the chooser can return is one FAISS can build
        faiss.index_factory(dim, factory_string(choice.key), faiss.METRIC_INNER_PRODUCT)
    assert roomy.bytes > tight.bytes


def test_choose_index_refuses_a_budget_nothing_fits():
    with pytest.raises(IndexerError, match=r"memory budget of 100 MiB is too small for 2000000 vectors "
                                             r"of dimension 768: the most compressed index needs about \d+ MiB"):
        choose_index(2_000_000, 768, parse_memory("100MB"))
    with pytest.raises(IndexerError, match="empty store"):
        choose_index(0, 64, parse_memory("4GB"))


@pytest.mark.parametrize("budget", ["1MB", "10MB", "100MB", "1GB", "8GB", "64GB"])
@pytest.mark.parametrize("n, dim", [(5_000, 64), (200_000, 512), (3_000_000, 768)])
def test_chosen_index_fits_the_budget(n, dim, budget):
    limit = parse_memory(budget)
    try:
        choice = choose_index(n, dim, limit)
    except IndexerError as e:
        assert "too small" in str(e)
        # refused only when even the most compressed candidate does not fit
        assert estimate_bytes(f"IVF{nlist_for(n)},PQ{pq_m_for(dim)}x4fs", n, dim) > limit
        return
    assert choice.bytes == estimate_bytes(choice.key, n, dim) <= limit


# ---------------------------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("sizes", [[400], [7, 3, 200, 190], [250, 149, 1], [64] * 7])
def test_exact_search_over_batches_is_brute_force(sizes):
    n, k = 400, 10
    vectors = low_rank(n, seed=3)
    ids = 1000 + 3 * np.arange(n, dtype=np.int64)
    queries = low_rank(25, seed=4)
    scores, found = exact_search(queries, batches_of(ids, vectors, sizes), k)
    want_scores, want_ids = brute_force(queries, vectors, ids, k)
    assert found.shape == (25, k) and found.dtype == np.int64
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_exact_search_with_fewer_vectors_than_k():
    vectors = low_rank(6, seed=5)
    ids = np.array([50, 40, 30, 20, 10, 5], dtype=np.int64)
    queries = low_rank(3, seed=6)
    scores, found = exact_search(queries, batches_of(ids, vectors, [4, 2]), 10)
    want_scores, want_ids = brute_force(queries, vectors, ids, 6)
    np.testing.assert_array_equal(found[:, :6], want_ids)
    np.testing.assert_allclose(scores[:, :6], want_scores, atol=1e-5)
    assert (found[:, 6:] == -1).all()


def test_recall_counts_misses_and_accepts_exact_ties():
    truth = np.array([[1, 2, 3, 4]])
    truth_scores = np.array([[0.9, 0.8, 0.7, 0.7]], dtype=np.float32)  # 4 ties the exact 3rd
    assert recall_at_k(truth[:, :3], truth, truth_scores, 3) == Recall(1.0, 1.0)
    assert recall_at_k(np.array([[1, 2, 9]]), truth, truth_scores, 3) == Recall(pytest.approx(2 / 3),
                                                                                pytest.approx(2 / 3))
    # 4 is an equally right answer by its exact score; by ids alone it is a miss
    assert recall_at_k(np.array([[1, 2, 4]]), truth, truth_scores, 3) == Recall(pytest.approx(2 / 3), 1.0)
    # a returned duplicate counts once
    assert recall_at_k(np.array([[1, 1, 2]]), truth, truth_scores, 3).fair == pytest.approx(2 / 3)
    # over several queries, the standard error of the per-query shares (1, 2/3): std / √n
    two = recall_at_k(np.array([[1, 2, 3], [1, 2, 9]]), np.repeat(truth, 2, 0), np.repeat(truth_scores, 2, 0), 3)
    assert two.error == pytest.approx(np.std([1, 2 / 3], ddof=1) / np.sqrt(2))
    assert two.reaches(two.fair - 1.645 * two.error) and not two.reaches(two.fair - 1.6 * two.error)


def test_recall_judges_returned_ids_by_their_exact_scores_not_the_index_scores():
    """A quantised index whose approximate scores run high: the old rule (an answer is right when its APPROXIMATE
    score reaches the exact k-th score) counted its two near misses as ties; by hand, from the exact
    similarities, 3 of 5 are right, and a list k deep or deeper gives the same."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    ids = np.arange(200, dtype=np.int64)
    k = 5
    exact = queries @ vectors.T
    order = np.argsort(-exact, axis=1)
    kth = exact[np.arange(3), order[:, k - 1]]
    found = np.concatenate([order[:, :3], order[:, 7:9]], axis=1)  # the exact top 3, then the 8th and 9th
    approximate = np.take_along_axis(exact, found, 1)
    approximate[:, 3:] = kth[:, None] + 0.01  # inflated past the exact k-th score
    old_rule = np.mean([(approximate[q] >= kth[q] - 1e-6).mean() for q in range(3)])
    by_hand = np.mean([(exact[q, found[q]] >= kth[q] - 1e-6).mean() for q in range(3)])
    assert (old_rule, by_hand) == (1.0, pytest.approx(3 / 5))
    for depth in (k, k + 10):  # a list k deep asks the vectors about every id outside it; deeper, none
        truth_scores, truth = exact_search(queries, batches_of(ids, vectors, [64, 64, 72]), depth)
        asked = []

        def rescore(rows, wanted, asked=asked):
            asked.append(len(wanted))
            return rescorer(queries, batches_of(ids, vectors, [100, 100]))(rows, wanted)

        recall = recall_at_k(found, truth, truth_scores, k, rescore)
        assert recall == Recall(pytest.approx(3 / 5), pytest.approx(by_hand))
        assert asked == ([6] if depth == k else [])


def test_an_exact_duplicate_of_the_kth_answer_is_right_by_its_exact_score():
    vectors = np.eye(8, dtype=np.float32)[:6]
    vectors = np.concatenate([vectors, vectors[[2]]])  # id 6 duplicates id 2
    query = np.array([[4, 3, 2, 0.5, 0.2, 0.1, 0, 0]], dtype=np.float32)
    ids = np.arange(7, dtype=np.int64)
    truth_scores, truth = exact_search(query, batches_of(ids, vectors, [7]), 3)  # 0, 1, then 2 or 6
    other = 6 if truth[0, 2] == 2 else 2
    rescore = rescorer(query, batches_of(ids, vectors, [3, 4]))
    assert recall_at_k(np.array([[0, 1, other]]), truth, truth_scores, 3, rescore) == Recall(
        pytest.approx(2 / 3), 1.0)
    assert recall_at_k(np.array([[0, 1, 3]]), truth, truth_scores, 3, rescore).fair == pytest.approx(2 / 3)


@pytest.mark.parametrize("low, high, threshold", [(1, 4096, 52), (1, 4096, 1), (1, 64, 64), (1, 64, 65),
                                                   (10, 4096, 80), (1, 100, 33)])
def test_smallest_finds_the_least_value_that_reaches_the_target(low, high, threshold):
    asked = []

    def reaches(value):
        asked.append(value)
        return value >= threshold

    found = smallest(reaches, low, high)
    assert found == min(max(threshold, low), high)
    assert len(asked) <= 2 * (high - low).bit_length() + 2  # doubling, then bisection: no linear scan
    assert len(set(asked)) == len(asked) or found == high


def test_the_tuner_stops_at_the_smallest_nprobe_not_the_next_power_of_two(corpus_vectors):
    """On an IVF index, every nprobe below the tuned one misses the target (with the 95 % confidence margin) and
    the tuned one reaches it."""
    ids, vectors, _ = corpus_vectors
    index = faiss.index_factory(DIM, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add_with_ids(vectors[300:], ids[300:])
    queries = np.ascontiguousarray(vectors[:300])
    others = batches_of(ids[300:], vectors[300:], [2000, 3700])
    truth = exact_search(queries, others, K + 10)
    nprobe_recall = {p: measure_at(index, queries, truth, p) for p in range(1, 65)}
    at21 = nprobe_recall[21]
    target = at21.fair - 1.645 * at21.error - 1e-9  # one 21 reaches, and with it, if recall grows, every larger
    params, recall = tune(index, queries, truth, K, target, rescorer(queries, others))
    chosen = int(params.removeprefix("nprobe="))
    assert recall == nprobe_recall[chosen] and recall.reaches(target)
    assert not any(nprobe_recall[p].reaches(target) for p in range(1, chosen))
    assert chosen <= 21


@pytest.mark.parametrize("key, second", [("IVF64,PQ16x4fs,Refine(SQ8)", "k_factor_rf"),
                                         ("IVF64_HNSW32,Flat", "quantizer_efSearch")])
def test_a_two_knob_index_is_tuned_to_a_pair_whose_second_knob_is_least(corpus_vectors, key, second):
    """Refined IVF-PQ (nprobe, k_factor_rf) and IVF with an HNSW quantiser (nprobe, quantizer_efSearch): the pair
    reaches the target, and one less of the second knob would not."""
    ids, vectors, _ = corpus_vectors
    index = faiss.index_factory(DIM, factory_string(key), faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add_with_ids(vectors[300:], ids[300:])
    queries = np.ascontiguousarray(vectors[:300])
    others = batches_of(ids[300:], vectors[300:], [2000, 3700])
    truth = exact_search(queries, others, K + 10)
    assert [name for name, _, _ in tuning(index, K)] == ["nprobe", second]
    params, recall = tune(index, queries, truth, K, 0.9, rescorer(queries, others))
    values = dict(p.split("=") for p in params.split(","))
    assert list(values) == ["nprobe", second] and recall.reaches(0.9)
    low = int(values[second]) - 1
    if low >= (1 if second == "k_factor_rf" else 16):
        faiss.ParameterSpace().set_index_parameters(index, f"nprobe={values['nprobe']},{second}={low}")
        assert not recall_at_k(index.search(queries, K)[1], truth[1], truth[0], K).reaches(0.9)


def measure_at(index, queries, truth, nprobe):
    faiss.ParameterSpace().set_index_parameters(index, f"nprobe={nprobe}")
    return recall_at_k(index.search(queries, K)[1], truth[1], truth[0], K)


# ---------------------------------------------------------------------------------------------- building

N, DIM, K = 6_000, 64, 10


@pytest.fixture(scope="module")
def corpus_vectors():
    basis = np.random.default_rng(1234).standard_normal((16, DIM))
    vectors = low_rank(N, DIM, basis=basis, seed=10)
    ids = 1000 + 3 * np.arange(N, dtype=np.int64)  # not positions: search must return these
    # held-out queries from the same distribution, never seen by tuning
    queries = low_rank(200, DIM, basis=basis, seed=11)
    return ids, vectors, queries


def _build(corpus_vectors, key, **kwargs):
    ids, vectors, _ = corpus_vectors
    rng = np.random.default_rng(7)
    tune = np.sort(rng.choice(N, 300, replace=False))
    return build_index(batches_of(ids, vectors, 1_700), N, DIM, key,
                       sample_vectors=lambda m: vectors[np.random.default_rng(8).choice(N, m, replace=False)],
                       recall_queries=vectors[tune], recall_rows=ids[tune], progress=False, **kwargs)


@pytest.mark.parametrize("key, knob, target", [
    ("Flat", None, 0.95),
    ("HNSW32", "efSearch=", 0.95),
    ("IVF64,Flat", "nprobe=", 0.95),
    ("IVF64,SQ8", "nprobe=", 0.95),
    pytest.param("IVF64,PQ16x4fs,Refine(SQ8)", "nprobe=", 0.9, marks=pytest.mark.slow),
])
def test_build_index_returns_ids_and_reaches_recall(corpus_vectors, key, knob, target):
    ids, vectors, queries = corpus_vectors
    built = _build(corpus_vectors, key, target_recall=target)
    assert built.index.ntotal == N and built.index.d == DIM
    assert built.key == key and built.factory == factory_string(key)
    assert built.device == "cpu" and built.recall_queries == 300
    assert set(built.seconds) >= {"train", "add", "tune"}
    if knob is None:
        assert built.params == "" and built.recall == Recall(1.0, 1.0)
    else:
        assert built.params.startswith(knob) and built.params.split("=")[-1].isdigit()
        assert built.recall.fair >= target

    # the rows held out for tuning were added afterwards: each finds itself
    tune = np.sort(np.random.default_rng(7).choice(N, 300, replace=False))
    _, found = built.index.search(np.ascontiguousarray(vectors[tune]), 1)
    assert (found[:, 0] == ids[tune]).mean() >= 0.95

    # the tuned index, searched with held-out queries, returns row ids and agrees with brute force
    scores, found = built.index.search(queries, K)
    want_scores, want_ids = brute_force(queries, vectors, ids, K + 10)
    assert np.isin(found, ids).all(), "search returns the given ids, never positions"
    recall = recall_at_k(found, want_ids, want_scores, K).fair
    assert recall >= target - 0.05, f"{key}: held-out recall {recall:.3f}"
    assert abs(recall - built.recall.fair) < 0.1
    # a stored vector finds itself first
    _, self_found = built.index.search(vectors[[0, 1234, N - 1]], 1)
    assert self_found[:, 0].tolist() == [ids[0], ids[1234], ids[N - 1]]

    # the estimate used against --memory-budget is the right order of size
    size = len(faiss.serialize_index(built.index))
    assert 0.5 * size <= estimate_bytes(key, N, DIM) <= 2 * size, (key, size)


def test_build_index_with_params_survives_serialisation(corpus_vectors, tmp_path):
    """What index.json records (params) re-applied to the index read back gives the same answers."""
    _, _, queries = corpus_vectors
    built = _build(corpus_vectors, "IVF64,Flat")
    path = tmp_path / "index.faiss"
    faiss.write_index(built.index, str(path))
    loaded = faiss.read_index(str(path))
    faiss.ParameterSpace().set_index_parameters(loaded, built.params)
    np.testing.assert_array_equal(loaded.search(queries, K)[1], built.index.search(queries, K)[1])


def test_bad_factory_key_is_an_indexer_error(corpus_vectors):
    with pytest.raises(IndexerError, match="FAISS cannot build index key 'NotAnIndex42'"):
        _build(corpus_vectors, "NotAnIndex42")


def test_too_few_vectors_for_ivf_is_an_indexer_error():
    vectors = low_rank(50, seed=1)
    ids = np.arange(50, dtype=np.int64)
    with pytest.raises(IndexerError, match="too few to train 64 clusters"):
        build_index(batches_of(ids, vectors, 50), 50, 64, "IVF64,Flat", sample_vectors=lambda m: vectors[:m],
                    recall_queries=vectors[:5], recall_rows=ids[:5], progress=False)


@pytest.mark.skipif(faiss_gpu_count() > 0, reason="FAISS sees a GPU here")
def test_cuda_without_faiss_gpu_falls_back_to_cpu_with_a_note(corpus_vectors):
    ids, vectors, _ = corpus_vectors
    built = _build(corpus_vectors, "Flat", device="cuda")
    assert built.device == "cpu"
    assert any("no GPU usable by FAISS" in note for note in built.notes), built.notes
    assert built.index.ntotal == N
    assert built.index.search(vectors[:1], 1)[1][0, 0] == ids[0]
    # asking for the CPU adds no note
    assert _build(corpus_vectors, "Flat", device="cpu").notes == []


@pytest.mark.parametrize("key, kind, knob, gpu", [
    ("Flat", "flat", None, True),
    ("HNSW32", "hnsw", "efSearch", False),
    ("IVF16,Flat", "ivf", "nprobe", True),
    ("IVF16,SQ8", "ivf", "nprobe", True),
    ("IVF16,PQ8x4fs", "ivf-fastscan", "nprobe", False),
    ("IVF16,PQ8x4fs,Refine(SQ8)", "refine", "nprobe", False),
    ("PQ8", "other", None, False),
])
def test_each_index_kind_is_known_from_its_key_and_from_the_built_index(key, kind, knob, gpu):
    index = faiss.index_factory(16, factory_string(key), faiss.METRIC_INNER_PRODUCT)
    assert kind_of_key(key).name == kind_of(index).name == kind
    knobs = tuning(index, 10)
    assert (knobs[0][0] if knobs else None) == knob
    assert [name for name, _, _ in knobs[1:]] == (["k_factor_rf"] if kind == "refine" else [])
    assert supports_gpu(index) == gpu
    assert (key == factory_string(key)) == kind.startswith("ivf")  # IVF keeps ids itself; the rest in IDMap2
    params = selector_params(index, faiss.IDSelectorRange(0, 10), "nprobe=4,efSearch=99")
    assert (params is None) == (kind in ("refine", "other"))
    if kind.startswith("ivf"):
        assert params.nprobe == 4
    if kind == "hnsw":
        assert params.efSearch == 99
