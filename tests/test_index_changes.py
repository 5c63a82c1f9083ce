"""An index follows a changing corpus: `retrieval index add / delete / compact / rebuild` through the CLI (and the
Python methods), on Flat, IVF and HNSW indexes over real FAISS and Parquet; readers keep the version they opened;
a running server picks up the new version; a SIGKILL at several moments of each change, then the same command
again, leaves every live item exactly once and no deleted item searchable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import duckdb
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DURABILITY_CALLS, RETRIEVAL, STRACE, kill_at, needs_strace, run_cli

import retrieval
from evaluation.shapesworld import make_shapesworld
from retrieval.files import folder_lock
from retrieval.index_changes import add_items, delete_items
from retrieval.index_folder import read_index_folder
from retrieval.index_update import store_path_of
from retrieval.indexing import build_index_folder
from retrieval.store import EmbeddingStore

KEYS = {"flat": "Flat", "ivf": "IVF8,Flat", "hnsw": "HNSW32"}
FIRST = 300


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """400 ShapesWorld items as first.jsonl (300) and more.jsonl (100), and the records of both."""
    root = make_shapesworld(tmp_path_factory.mktemp("changes"), n=FIRST + 100, size=32, seed=1,
                            train_pairs=False, progress=False).parent
    rows = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines() if line.strip()]
    for name, part in (("first.jsonl", rows[:FIRST]), ("more.jsonl", rows[FIRST:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"first": root / "first.jsonl", "more": root / "more.jsonl", "root": root}


@pytest.fixture(scope="module")
def built(corpora, tmp_path_factory) -> dict[str, Path]:
    """An index of each kind over the first 300 items, each with its own store inside it."""
    base = tmp_path_factory.mktemp("built")
    folders = {}
    for kind, key in KEYS.items():
        folders[kind] = base / kind
        build_index_folder(corpora["first"], folders[kind], model="test-tiny", index_key=key, progress=False,
                           encode_options={"workers": 0, "batch_size": 64})
    return folders


@pytest.fixture(scope="module")
def grown(built, corpora, tmp_path_factory) -> dict[str, Path]:
    """Each built index with the other 100 items added (in process: the add is not what these tests look at)."""
    base = tmp_path_factory.mktemp("grown")
    for kind, folder in built.items():
        shutil.copytree(folder, base / kind)
        add_items(base / kind, corpora["more"], workers=0, progress=False)
    return {kind: base / kind for kind in built}


def fresh(built: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    folder = tmp_path / kind
    shutil.copytree(built[kind], folder)
    return folder


def records(path: Path) -> list[dict]:
    """The corpus's rows, their images made absolute."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r | {"image": str((path.parent / r["image"]).resolve())} for r in rows]


def unique(rows: list[dict]) -> list[dict]:
    """Items no other item equals in image and text (an identical twin could come first instead)."""
    seen: dict[tuple, int] = {}
    for r in rows:
        seen[(Path(r["image"]).read_bytes(), r["text"])] = seen.get((Path(r["image"]).read_bytes(), r["text"]), 0) + 1
    return [r for r in rows if seen[(Path(r["image"]).read_bytes(), r["text"])] == 1]


def live_state(folder: Path) -> tuple[list[str], np.ndarray]:
    """The live ids of the index's store version (each must be there once) and the row ids its FAISS index holds
    that search can return."""
    searcher = retrieval.open_index(folder)
    ids = searcher.metadata["id"].to_pylist()
    assert len(ids) == len(set(ids)), "an item is there twice"
    everything = searcher.search_vectors(np.ones((1, searcher.info["dim"]), np.float32) / searcher.info["dim"] ** .5,
                                         searcher.store.count + 5)[1][0]
    return ids, np.sort(everything[everything >= 0])


def assert_consistent(folder: Path) -> list[str]:
    """Every live item is in the index exactly once and search returns nothing else; returns the live ids."""
    ids, searchable = live_state(folder)
    info, index = read_index_folder(folder)
    store = EmbeddingStore(store_path_of(folder, info), version=info["store"]["version"])
    assert np.array_equal(searchable, store.live_rows())
    if info.get("removal") != "selector":
        assert index.ntotal == store.count
    return ids


def one_error_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:], proc.stderr
    return lines[-1]


# ---------------------------------------------------------------------------------------------- add


@pytest.mark.parametrize("kind", KEYS)
def test_added_items_are_found_first_by_their_own_image_and_text(kind, built, corpora, tmp_path):
    folder = fresh(built, kind, tmp_path)
    out = run_cli("index", "add", folder, corpora["more"], "--workers", "0").stdout
    assert "added 100 (replacing 0), unchanged 0" in out and "store version 2 holds 400 items" in out, out
    searcher = retrieval.open_index(folder)
    for item in unique(records(corpora["more"])):
        assert searcher.search(image=item["image"], text=item["text"], k=1)[0].id == item["id"]
    assert sorted(assert_consistent(folder)) == sorted(r["id"] for r in records(corpora["first"]) +
                                                       records(corpora["more"]))
    again = run_cli("index", "add", folder, corpora["more"], "--workers", "0").stdout
    assert "added 0 (replacing 0), unchanged 100" in again and "store version 2" in again, again


def test_an_add_records_what_it_measured_and_the_ivf_keeps_its_training(built, grown):
    _, before = read_index_folder(built["ivf"])
    info, after = read_index_folder(grown["ivf"])
    assert np.array_equal(faiss.rev_swig_ptr(faiss.downcast_index(after.quantizer).get_xb(), 8 * info["dim"]),
                          faiss.rev_swig_ptr(faiss.downcast_index(before.quantizer).get_xb(), 8 * info["dim"]))
    assert info["updates"][-1] | {"ann_recall@10": 0} == {"version": 2, "added": 100, "removed": 0,
                                                          "ann_recall@10": 0}
    assert 0 < info["drift"]["ann_recall@10"] <= 1 and info["drift"]["added_since_build"] == pytest.approx(1 / 3,
                                                                                                            abs=1e-3)


def test_changed_content_needs_upsert_which_replaces_the_item(built, corpora, tmp_path):
    folder = fresh(built, "hnsw", tmp_path)
    rows = records(corpora["first"])
    changed = rows[:3] + [rows[3] | {"text": "a corrected caption: a purple moon over the sea"}]
    manifest = tmp_path / "fix.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in changed))
    refused = run_cli("index", "add", folder, manifest, "--workers", "0", check=False)
    assert "--upsert" in one_error_line(refused) and rows[3]["id"] in refused.stderr
    out = run_cli("index", "add", folder, manifest, "--workers", "0", "--upsert").stdout
    assert "added 1 (replacing 1), unchanged 3" in out, out
    hits = json.loads(run_cli("search", "--index", folder, "--image", rows[3]["image"], "--text",
                              changed[3]["text"], "-k", "3", "--json").stdout)
    assert hits[0]["id"] == rows[3]["id"] and hits[0]["text"] == changed[3]["text"]
    assert [h["text"] for h in hits].count(rows[3]["text"]) == 0 or rows[3]["text"] != changed[3]["text"]
    assert assert_consistent(folder).count(rows[3]["id"]) == 1


def test_an_item_whose_new_version_cannot_be_read_keeps_its_old_one(built, corpora, tmp_path):
    folder = fresh(built, "flat", tmp_path)
    item = records(corpora["first"])[7]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(90)))
    manifest = tmp_path / "fix.jsonl"
    manifest.write_text(json.dumps(item | {"image": str(broken), "text": "a new caption"}) + "\n")
    out = run_cli("index", "add", folder, manifest, "--workers", "0", "--upsert").stdout
    assert "added 0 (replacing 0), unchanged 0, skipped 1" in out, out
    searcher = retrieval.open_index(folder)
    assert searcher.search(image=item["image"], text=item["text"], k=1)[0].text == item["text"]
    assert EmbeddingStore(folder / "store").version == 1


def test_row_ids_and_part_names_are_never_given_twice(grown, corpora, tmp_path):
    folder = fresh(grown, "flat", tmp_path)
    ids = tmp_path / "ids.txt"
    ids.write_text("\ufeff" + "".join(r["id"] + "\n" for r in records(corpora["more"])))  # with a byte-order mark
    assert "deleted 100;" in run_cli("index", "delete", folder, "--ids", ids).stdout
    run_cli("index", "compact", folder)
    assert not (folder / "store" / "part-00001.parquet").exists()
    renamed = tmp_path / "again.jsonl"
    renamed.write_text("".join(json.dumps(r | {"id": "again-" + r["id"]}) + "\n" for r in records(corpora["more"])))
    add_items(folder, renamed, workers=0, progress=False)
    store = EmbeddingStore(folder / "store")
    assert store.live_rows().max() == FIRST + 199 and store.live_rows()[FIRST] == FIRST + 100
    assert max(p["file"] for p in store.parts) >= "part-00002.parquet"


def test_indexes_sharing_a_store_follow_it_with_sync_or_rebuild(built, corpora, tmp_path):
    store = tmp_path / "emb"
    shutil.copytree(built["flat"] / "store", store)
    run_cli("index", "build", store, "--out", tmp_path / "a", "--index-key", "Flat")
    run_cli("index", "build", store, "--out", tmp_path / "b", "--index-key", "HNSW32")
    out = run_cli("index", "add", tmp_path / "a", corpora["more"], "--workers", "0").stdout
    assert "`retrieval index sync`" in out, out
    behind = run_cli("search", "--index", tmp_path / "b", "--text", "a red circle", "--json")
    assert len(json.loads(behind.stdout)) == 10 and "index sync" in behind.stderr
    assert "at store version 2 (it was at 1), 400 items" in run_cli("index", "sync", tmp_path / "b").stdout
    assert sorted(assert_consistent(tmp_path / "b")) == sorted(assert_consistent(tmp_path / "a"))
    run_cli("index", "delete", tmp_path / "a", "--where", "row < 10")
    run_cli("index", "compact", tmp_path / "a")
    gone = run_cli("search", "--index", tmp_path / "b", "--text", "a red circle", check=False)
    assert f"retrieval index rebuild {tmp_path / 'b'}" in one_error_line(gone)
    run_cli("index", "rebuild", tmp_path / "b")
    assert len(assert_consistent(tmp_path / "b")) == 390


# ---------------------------------------------------------------------------------------------- delete, compact


@pytest.mark.parametrize("kind", KEYS)
def test_deleted_items_are_never_returned_and_k_results_still_come(kind, grown, corpora, tmp_path):
    folder = fresh(grown, kind, tmp_path)
    out = run_cli("index", "delete", folder, "--where", "row % 8 = 0").stdout
    assert "deleted 50; store version 3 holds 350 items" in out, out
    gone = [r for i, r in enumerate(records(corpora["first"]) + records(corpora["more"])) if i % 8 == 0]
    searcher = retrieval.open_index(folder)
    for item in gone[:20]:
        hits = searcher.search(image=item["image"], text=item["text"], k=350)
        assert len(hits) == 350 and not {h.id for h in hits} & {g["id"] for g in gone}
    filtered = searcher.search(text="a red circle", k=400, where="split = 'train' OR split <> 'train'")
    assert len(filtered) == 350 and not {h.id for h in filtered} & {g["id"] for g in gone}
    assert len(assert_consistent(folder)) == 350
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{gone[0]['id']}\nno-such-id\n")
    out = run_cli("index", "delete", folder, "--ids", ids).stdout
    assert "deleted 0 (ids not in it: 2)" in out, out


@pytest.mark.parametrize("kind", KEYS)
def test_compact_keeps_the_answers_and_frees_disk(kind, grown, corpora, tmp_path):
    folder = fresh(grown, kind, tmp_path)
    delete_items(folder, where="row % 4 = 1")
    queries = unique(records(corpora["more"]))[:15]

    def answers() -> list[list[tuple[str, float]]]:
        searcher = retrieval.open_index(folder)
        return [[(h.id, round(h.score, 4)) for h in searcher.search(image=q["image"], text=q["text"], k=5)]
                for q in queries]

    def disk() -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    before, size = answers(), disk()
    out = run_cli("index", "compact", folder).stdout
    assert "without the 100 deleted rows" in out, out
    if kind == "hnsw":  # an HNSW graph cannot drop nodes: compaction rebuilds it, and its answers may shift
        got = answers()
        assert sum(a[0] == b[0] for a, b in zip(before, got)) >= 14
        assert "rebuilt the index" in out
    else:
        assert answers() == before
    assert disk() < size
    store = folder / "store"
    assert not list(store.glob("deleted-*.parquet")) and len(assert_consistent(folder)) == 300
    live = duckdb.sql(f"SELECT count(*), count(DISTINCT id) FROM {EmbeddingStore(store).sql_source()}").fetchall()[0]
    assert live == (300, 300)
    assert "rewrote 0 of" in run_cli("index", "compact", folder).stdout


def test_the_store_reads_its_live_rows_with_duckdb_and_pyarrow(built, corpora, tmp_path):
    folder = fresh(built, "flat", tmp_path)
    run_cli("index", "delete", folder, "--where", "n_objects > 1")
    store = EmbeddingStore(folder / "store")
    expected = sum(1 for r in records(corpora["first"]) if r["n_objects"] <= 1)
    assert store.count == expected and store.read_table(["id"]).num_rows == expected
    assert duckdb.sql(f"SELECT max(n_objects), count(*) FROM {store.sql_source()}").fetchall()[0] == (1, expected)
    table = store.read_table(["id", "embedding"])  # pyarrow; `.to_pandas()` where pandas is installed
    assert table.num_rows == expected and table.schema.field("embedding").type.list_size == store.dim
    documented = duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/store/part-*.parquet') WHERE row NOT IN "
                            f"(SELECT row FROM read_parquet('{folder}/store/deleted-*.parquet'))").fetchall()[0][0]
    assert documented == expected


def test_deleting_everything_leaves_an_index_that_answers_nothing_and_grows_again(built, corpora, tmp_path):
    folder = fresh(built, "hnsw", tmp_path)
    run_cli("index", "delete", folder, "--where", "true")
    assert "no results" in run_cli("search", "--index", folder, "--text", "a red circle").stdout
    assert "no results" in run_cli("search", "--index", folder, "--text", "a red circle", "--where", "row > 3").stdout
    run_cli("index", "compact", folder)
    assert len(list((folder / "store").glob("part-*.parquet"))) == 1  # no rows, but the store's columns
    assert "no results" in run_cli("search", "--index", folder, "--text", "a red circle").stdout
    run_cli("index", "add", folder, corpora["more"], "--workers", "0")
    assert sorted(assert_consistent(folder)) == sorted(r["id"] for r in records(corpora["more"]))


TAMPERED = {
    "a deletion file named as a path": lambda m: m["deletions"][0].update(file="../deleted-00002.parquet"),
    "removed before added": lambda m: m["deletions"][0].update(removed=1),
    "a version before the oldest": lambda m: m.update(store_version=1, oldest_version=2),
    "a part range that misses its rows": lambda m: m["parts"][0].update(rows=[5, 305]),
    "a count that is not the live rows": lambda m: m.update(count=m["count"] + 1),
    "a version that is not a number": lambda m: m.update(store_version="2"),
}


@pytest.mark.parametrize("how", [*TAMPERED, "a deletion file changed"])
def test_a_tampered_version_record_is_refused_with_one_line(how, built, corpora, tmp_path):
    folder = fresh(built, "flat", tmp_path)
    delete_items(folder, where="row < 10")
    manifest_path = folder / "store" / "manifest.json"
    if how in TAMPERED:
        manifest = json.loads(manifest_path.read_text())
        TAMPERED[how](manifest)
        manifest_path.write_text(json.dumps(manifest))
    else:
        deletions = folder / "store" / "deleted-00002.parquet"
        pq.write_table(pa.table({"row": pa.array([11, 12, 13, 14, 15, 16, 17, 18, 19, 20], pa.int64())}), deletions)
    for args in (("search", "--index", folder, "--text", "a red circle"), ("index", "add", folder, corpora["more"]),
                 ("index", "compact", folder)):
        assert one_error_line(run_cli(*args, check=False)).startswith("error: "), args


# ---------------------------------------------------------------------------------------------- Python, readers


def test_the_python_methods_and_a_reader_that_keeps_its_version(built, corpora, tmp_path):
    folder = fresh(built, "flat", tmp_path)
    old = retrieval.open_index(folder)
    writer = retrieval.open_index(folder)
    rows = records(corpora["more"])[:10]
    writer.add(rows)
    assert writer.store.version == 2 and writer.store.count == FIRST + 10
    assert writer.search(image=rows[0]["image"], text=rows[0]["text"], k=1)[0].id == rows[0]["id"]
    first = records(corpora["first"])
    writer.delete(ids=[first[0]["id"], first[1]["id"]])
    writer.compact()
    assert writer.store.count == FIRST + 8 and first[0]["id"] not in writer.metadata["id"].to_pylist()
    # the reader opened first still answers from version 1, its files pinned though compaction removed them
    assert old.store.version == 1 and old.store.count == FIRST
    assert not (folder / "store" / "part-00000.parquet").exists()
    hits = old.search(text=first[0]["text"], k=FIRST, where="row >= 0")
    assert len(hits) == FIRST and first[0]["id"] in {h.id for h in hits}
    assert retrieval.open_index(folder).store.count == FIRST + 8


def test_a_second_writer_is_refused_and_bad_requests_get_one_line(built, corpora, tmp_path):
    folder = fresh(built, "flat", tmp_path)
    with folder_lock(folder, "index add"):
        busy = run_cli("index", "delete", folder, "--where", "row < 5", check=False)
    assert f"in use by index add (process {os.getpid()})" in one_error_line(busy)
    cases = [
        (("index", "delete", folder), "--ids FILE or --where SQL"),
        (("index", "delete", folder, "--where", "row < 1", "--ids", tmp_path / "x"), "one of them"),
        (("index", "delete", folder, "--ids", tmp_path / "missing.txt"), "not found"),
        (("index", "delete", folder, "--where", "row <"), "invalid --where"),
        (("index", "delete", folder, "--where", "1=1; COPY (SELECT 1) TO '/tmp/x.csv'"), "--where"),
        (("index", "add", tmp_path / "nowhere", corpora["more"]), "not an index folder"),
        (("index", "add", folder, tmp_path / "none.jsonl"), "not found"),
        (("index", "compact", tmp_path), "not an index folder"),
    ]
    (tmp_path / "x").write_text("a\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "z", "text": "hello", "colour_of_sky": "blue"}) + "\n")
    cases.append((("index", "add", folder, bad, "--workers", "0"), "colour_of_sky"))
    for args, message in cases:
        assert message in one_error_line(run_cli(*args, check=False)), args
    assert EmbeddingStore(folder / "store").version == 1 and len(assert_consistent(folder)) == FIRST
    run_cli("index", "delete", folder, "--where", "row < 5")  # the store has changed since it was encoded:
    again = run_cli("encode", corpora["first"], "--model", "test-tiny", "--out", folder / "store", check=False)
    assert "retrieval index add" in one_error_line(again)  # re-encoding it in place would lose the change


def test_a_running_server_serves_the_new_version_without_a_restart(built, corpora, tmp_path):
    from evaluation.bench.serve import ServerProcess

    folder = fresh(built, "flat", tmp_path)
    new = records(corpora["more"])[0]
    with ServerProcess(["--index", f"shapes={folder}"]) as server:
        def count() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/indexes", timeout=10) as r:
                return json.loads(r.read())["indexes"][0]["count"]

        assert count() == FIRST
        run_cli("index", "add", folder, corpora["more"], "--workers", "0")
        deadline = time.monotonic() + 30
        while count() != FIRST + 100 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert count() == FIRST + 100
        body = json.dumps({"index": "shapes", "text": new["text"], "k": 400}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{server.port}/search", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            hits = json.loads(r.read())["hits"]
        assert new["id"] in {h["id"] for h in hits} and len(hits) == FIRST + 100


# ---------------------------------------------------------------------------------------------- SIGKILL


def durability_moments(*args, log: Path, n: int = 7) -> list[tuple[str, int]]:
    """n moments, spread from the first to the last, at which to SIGKILL a CLI run: each a rename or fsync as
    (syscall, its count in the thread making it), which `kill_at` stops the process at. strace counts calls per
    thread, and an add commits its parts from a writer thread, so the count is taken in each thread."""
    subprocess.run([STRACE, "-f", "-qq", "-o", str(log), "-e", "trace=" + ",".join(DURABILITY_CALLS), str(RETRIEVAL),
                    *map(str, args)], check=True, capture_output=True, timeout=300)
    counts: dict[tuple[str, str], int] = {}
    calls = []
    for line in log.read_text().splitlines():
        tid, _, rest = line.partition(" ")
        name = rest.strip().split("(")[0]
        if name in DURABILITY_CALLS:
            counts[tid, name] = counts.get((tid, name), 0) + 1
            if (name, counts[tid, name]) not in calls:
                calls.append((name, counts[tid, name]))
    return [calls[i] for i in sorted({round(j * (len(calls) - 1) / (n - 1)) for j in range(n)})]


CHANGES = {  # name: (kind, what runs before, the command's arguments after the folder)
    "add": ("ivf", [], ["add", "{more}", "--workers", "0", "--upsert"]),
    "delete": ("hnsw", [["add", "{more}", "--workers", "0"]], ["delete", "--where", "row % 3 = 0"]),
    "compact": ("hnsw", [["add", "{more}", "--workers", "0"], ["delete", "--where", "row % 3 = 0"]], ["compact"]),
}


@pytest.mark.slow
@needs_strace
@pytest.mark.parametrize("change", CHANGES)
def test_sigkill_at_several_moments_then_the_same_command(change, built, grown, corpora, tmp_path):
    kind, before, command = CHANGES[change]
    base = fresh(grown if before else built, kind, tmp_path / "base")
    if len(before) > 1:
        delete_items(base, where=before[1][-1])
    args = ["index", command[0], "{folder}", *[a.format(more=corpora["more"]) for a in command[1:]]]
    old_ids = sorted(assert_consistent(base))
    traced = tmp_path / "traced"
    shutil.copytree(base, traced)
    calls = durability_moments(*[a.format(folder=traced) for a in args], log=tmp_path / "strace.log")
    final_ids = sorted(assert_consistent(traced))
    assert len(calls) >= 6, calls
    seen = set()
    for i, call in enumerate(calls):
        folder = tmp_path / f"killed-{i}"
        shutil.copytree(base, folder)
        proc = kill_at(call, *[a.format(folder=folder) for a in args])
        assert proc.returncode in (137, -9), (call, proc.returncode, proc.stderr)
        ids = sorted(assert_consistent(folder))
        assert ids in (old_ids, final_ids), call  # one version or the other, whole
        seen.add(tuple(ids))
        run_cli(*[a.format(folder=folder) for a in args])
        assert sorted(assert_consistent(folder)) == final_ids, call
        store = folder / "store"
        assert not (store / "adding").exists() and not [p for p in store.iterdir() if ".tmp-" in p.name]
    assert seen == {tuple(old_ids), tuple(final_ids)}  # killed before the commit and after it
