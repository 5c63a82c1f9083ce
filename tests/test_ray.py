"""`--engine ray` on a local Ray instance that this module starts (2 CPUs): the encode job writes the store the local
job writes, survives a killed driver or worker, and fills index shards as Ray tasks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from conftest import RETRIEVAL, run_cli
from test_encode import _errors, _manifest, _store_rows, _store_vectors

from evaluation.shapesworld import make_shapesworld
from retrieval.encode import encode_corpus

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # Ray starts in about 8 s and runs a small dataset in about 10 s on 2 cores

N, PART, BATCH = 1000, 128, 64
MISSING = (7, 300, 999)  # items whose image file is missing


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray instance for this module (2 CPUs: one actor, one reading task); its address for subprocesses."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """1,000 ShapesWorld items, three with a missing image and one without an image."""
    manifest = make_shapesworld(tmp_path_factory.mktemp("ray"), n=N, size=32, seed=5, train_pairs=False,
                                progress=False)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for p in MISSING:
        records[p]["image"] = f"images/missing-{p}.png"
    records[11].pop("image")
    path = manifest.with_name("items.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def local_store(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "store"
    encode_corpus(corpus, out, "test-tiny", batch_size=BATCH, workers=0, part_size=PART, progress=False)
    return out


def assert_same_store(store: Path, reference: Path) -> None:
    """The same rows, ids, vectors (to 1e-5), errors and part layout as the reference store."""
    assert _store_rows(store) == _store_rows(reference)
    ids, vectors = _store_vectors(store)
    ref_ids, ref_vectors = _store_vectors(reference)
    assert ids == ref_ids and len(ids) == N - len(MISSING)
    np.testing.assert_allclose(vectors, ref_vectors, atol=1e-5)
    assert _errors(store) == _errors(reference) and [e[0] for e in _errors(store)] == list(MISSING)
    layout = [{k: p[k] for k in ("file", "count", "rows", "positions", "errors")} for p in _manifest(store)["parts"]]
    assert layout == [{k: p[k] for k in ("file", "count", "rows", "positions", "errors")}
                      for p in _manifest(reference)["parts"]]
    assert _manifest(store)["complete"] and _manifest(store)["count"] == N - len(MISSING)


def test_ray_encode_writes_the_local_jobs_store(cluster, corpus, local_store, tmp_path):
    out = tmp_path / "store"
    # batches of 48 cross the 128-item parts: the driver splits them where parts end
    summary = encode_corpus(corpus, out, "test-tiny", batch_size=48, part_size=PART, progress=False, engine="ray")
    assert (summary.encoded, summary.errors) == (N - len(MISSING), len(MISSING))
    assert_same_store(out, local_store)


def encode_command(corpus: Path, out: Path, address: str) -> list[str]:
    return [str(RETRIEVAL), "encode", str(corpus), "--model", "test-tiny", "--out", str(out), "--engine", "ray",
            "--ray-address", address, "--part-size", str(PART), "--batch-size", "16"]


def wait_for_parts(out: Path, job: subprocess.Popen, parts: int) -> None:
    deadline = time.monotonic() + 120
    while len((_manifest(out) or {}).get("parts", [])) < parts:
        assert job.poll() is None, f"the job ended before committing {parts} parts: {job.communicate()}"
        assert time.monotonic() < deadline, "no part committed within 120 s"
        time.sleep(0.05)


def test_a_killed_worker_then_a_killed_driver_end_exactly_once(cluster, corpus, local_store, tmp_path):
    """SIGKILL the actor that holds the model mid-job (Ray replaces it and computes its batch again), later the
    driver itself; the same command then resumes after the committed parts."""
    out = tmp_path / "store"
    job = subprocess.Popen(encode_command(corpus, out, cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_parts(out, job, 1)
    actors = ray_processes("EmbedActor")
    assert len(actors) == 1, f"{len(actors)} embedding actors alive"
    os.kill(actors[0], signal.SIGKILL)
    wait_for_parts(out, job, 3)
    job.send_signal(signal.SIGKILL)
    job.communicate()
    left = _manifest(out)
    assert not left["complete"] and 3 <= len(left["parts"]) < -(-N // PART)
    proc = subprocess.run(encode_command(corpus, out, cluster), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed after {len(left['parts']) * PART} items already committed" in proc.stdout
    assert_same_store(out, local_store)


def ray_processes(name: str) -> list[int]:
    """The processes whose title (Ray sets it to the actor's class) names `name`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and name.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # ended meanwhile
            pass
    return pids


def test_actors_beyond_the_clusters_cpus_are_refused(cluster, corpus, tmp_path):
    proc = run_cli(*encode_command(corpus, tmp_path / "store", cluster)[1:], "--actors", "2", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == ("error: --actors 2 needs 3 CPUs in the Ray cluster (one per "
                                                    "actor and one to read with); it has 2")
    assert not (tmp_path / "store" / "part-00000.parquet").exists()


def test_ray_index_shards_match_local_shards(cluster, vector_store_20k, tmp_path):
    from retrieval.indexing import build_index_folder
    from retrieval.search import open_index

    local = build_index_folder(vector_store_20k, tmp_path / "local", index_key="IVF64,SQ8", shards=4,
                               progress=False)
    remote = build_index_folder(vector_store_20k, tmp_path / "ray", index_key="IVF64,SQ8", shards=4, engine="ray",
                                progress=False)
    assert remote["count"] == local["count"] == 20_000 and remote["search_params"] == local["search_params"]
    queries = np.random.default_rng(0).standard_normal((20, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with closing(open_index(tmp_path / "local")) as a, closing(open_index(tmp_path / "ray")) as b:
        assert np.array_equal(a.search_vectors(queries, 10)[1], b.search_vectors(queries, 10)[1])
