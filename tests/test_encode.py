"""The encode job end to end: corpus formats → Parquet embedding store, bad input (resume after SIGKILL:
test_encode_resume.py).

Stores are read back with DuckDB (the way users query them), embeddings are checked against real
forward passes of the registered `test-tiny` encoder, and the CLI runs as a real subprocess.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image

from retrieval.corpus import MAX_TEXT_CHARS
from retrieval.encode import encode_corpus
from retrieval.encoders import load_encoder
from retrieval.errors import RetrievalError
from retrieval.files import sha256_file
from retrieval.images import MAX_IMAGE_PIXELS
from retrieval.store import EmbeddingStore

DIM = 64  # test-tiny


# ---------------------------------------------------------------- helpers


def _q(path: Path | str) -> str:
    """A path as a DuckDB string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def _parts(out: Path) -> str:
    return f"read_parquet({_q(Path(out) / 'part-*.parquet')})"


def _store_rows(out: Path, columns: str = "row, id") -> list[tuple]:
    return duckdb.sql(f"SELECT {columns} FROM {_parts(out)} ORDER BY row").fetchall()


def _store_vectors(out: Path) -> tuple[list[str], np.ndarray]:
    rows = _store_rows(out, "id, embedding")
    return [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.float32).reshape(len(rows), -1)


def _errors(out: Path) -> list[tuple]:
    return duckdb.sql(f"SELECT position, id, error FROM read_parquet({_q(Path(out) / 'errors.parquet')}) "
                      "ORDER BY position").fetchall()


def _manifest(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / "manifest.json").read_text())
    except FileNotFoundError:
        return None


def _encoder():
    return load_encoder("test-tiny", device="cpu")


def _assert_dense_unique(out: Path, expected_ids: list[str] | set[str]) -> list[tuple]:
    """Every expected id exactly once, `row` dense 0..n-1; returns the (row, id) rows."""
    rows = _store_rows(out)
    ids = Counter(i for _, i in rows)
    assert set(ids) == set(expected_ids), (set(ids) ^ set(expected_ids))
    assert max(ids.values()) == 1, [i for i, c in ids.items() if c > 1]
    assert [r for r, _ in rows] == list(range(len(expected_ids)))
    return rows


def _assert_manifest_matches_files(out: Path) -> dict:
    """Committed parts: contiguous row ranges, file row counts and sha256 match, no stray files."""
    manifest = _manifest(out)
    row = 0
    for part in manifest["parts"]:
        assert part["rows"] == [row, row + part["count"]]
        path = out / part["file"]
        if part["count"]:
            assert part["sha256"] == sha256_file(path)
            n, lo, hi = duckdb.sql(f"SELECT count(*), min(row), max(row) FROM read_parquet({_q(path)})").fetchall()[0]
            assert (n, lo, hi + 1) == (part["count"], *part["rows"])
        else:
            assert not path.exists() and part["sha256"] is None
        row += part["count"]
    assert manifest["count"] == row
    on_disk = sorted(p.name for p in out.glob("part-*.parquet"))
    assert on_disk == sorted(p["file"] for p in manifest["parts"] if p["count"])
    assert not list(out.glob(".*.tmp-*"))
    return manifest


def _single_error_line(proc: subprocess.CompletedProcess, only_line: bool = True) -> str:
    """A user error: exit code 2, exactly one `error: ...` line, no traceback; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    if only_line:
        assert lines == errors, proc.stderr
    return errors[0]


def _noise_image(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _summary_first_line(stdout: str) -> str:
    return stdout.strip().splitlines()[0]


def _file_digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


# ---------------------------------------------------------------- 1. the CLI on the shapes corpus


@pytest.fixture(scope="module")
def cli_store(shapes_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "store"
    proc = run_cli("encode", shapes_corpus, "--model", "test-tiny", "--out", out, "--workers", "2",
                   "--part-size", "128", "--batch-size", "32")
    return out, proc


def test_cli_encode_writes_a_complete_store(cli_store, shapes_corpus):
    out, proc = cli_store
    records = [json.loads(line) for line in shapes_corpus.read_text().splitlines()]
    n = len(records)
    assert n == 300
    assert _summary_first_line(proc.stdout) == f"store {out}: {n} items encoded, 0 skipped ({n} in the corpus)"

    rows = _assert_dense_unique(out, [r["id"] for r in records])
    assert [i for _, i in rows] == [r["id"] for r in records]  # row order is corpus order

    # metadata carried through with its types; image paths made absolute; texts unchanged
    meta = _store_rows(out, "id, split, n_objects, shapes, text, image")
    assert [m[:5] for m in meta] == [(r["id"], r["split"], r["n_objects"], r["shapes"], r["text"]) for r in records]
    assert [m[5] for m in meta] == [str((shapes_corpus.parent / r["image"]).resolve()) for r in records]
    types = dict(duckdb.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {_parts(out)})")
                 .fetchall())
    assert types["n_objects"] == "BIGINT" and types["split"] == "VARCHAR" and types["row"] == "BIGINT"

    # unit vectors, equal to a direct forward pass of the model for a few items
    ids, vectors = _store_vectors(out)
    assert vectors.shape == (n, DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    picks = [0, 1, 127, 128, 200, 299]
    expected = _encoder().encode(images=[shapes_corpus.parent / records[i]["image"] for i in picks],
                                 texts=[records[i]["text"] for i in picks])
    np.testing.assert_allclose(vectors[picks], expected, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])

    manifest = _assert_manifest_matches_files(out)
    assert manifest["complete"] is True
    assert (manifest["count"], manifest["dim"], manifest["errors"]) == (n, DIM, 0)
    assert [p["rows"] for p in manifest["parts"]] == [[0, 128], [128, 256], [256, 300]]
    assert manifest["encoder"]["name"] == "test-tiny"
    assert manifest["encoder"]["weights_sha256"] == _encoder().weights_sha256
    assert manifest["dtype"] == "float32"
    assert manifest["metadata_columns"] == ["split", "n_objects", "shapes", "colours", "background"]
    assert (out / "errors.parquet").is_file() and _errors(out) == []

    store = EmbeddingStore(out)  # the library reader agrees with DuckDB
    assert store.complete and store.count == n
    np.testing.assert_allclose(np.concatenate([v for _, v in store.iter_batches()]), vectors, atol=0)


# ---------------------------------------------------------------- 2. corpus formats


FORMAT_RECORDS = [
    {"id": "both-1", "image": "img/a.png", "text": "a red circle", "stars": 3, "weight": 0.5, "tag": "x"},
    {"id": "image-only", "image": "img/b.png", "text": None, "stars": 1, "weight": 1.25, "tag": "y"},
    {"id": "text-only", "image": None, "text": "just some words", "stars": 7, "weight": 2.0, "tag": "z"},
    {"id": "both-2", "image": "img/sub/c.png", "text": "café ünïcode ✓", "stars": 10, "weight": -1.5, "tag": "x"},
]


@pytest.fixture(scope="module")
def format_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    for i, rec in enumerate(FORMAT_RECORDS):
        if rec["image"]:
            _noise_image(root / rec["image"], seed=i, size=(20 + 3 * i, 18 + i))
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for rec in FORMAT_RECORDS:  # absent rather than null, as people write it
            f.write(json.dumps({k: v for k, v in rec.items() if v is not None}, ensure_ascii=False) + "\n")
    with open(root / "corpus.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FORMAT_RECORDS[0]))
        writer.writeheader()
        writer.writerows(FORMAT_RECORDS)  # None is written as an empty cell
    pq.write_table(pa.Table.from_pylist(FORMAT_RECORDS), root / "corpus.parquet")
    return root


def _expected_vectors(root: Path, records: list[dict]) -> np.ndarray:
    return _encoder().encode(images=[root / r["image"] if r["image"] else None for r in records],
                             texts=[r["text"] for r in records])


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_manifest_formats_encode_images_texts_and_both(format_dir, suffix, tmp_path):
    out = tmp_path / "store"
    summary = encode_corpus(format_dir / f"corpus.{suffix}", out, "test-tiny", batch_size=3, workers=0,
                            part_size=3, progress=False)
    assert (summary.items, summary.encoded, summary.errors) == (4, 4, 0)
    rows = _store_rows(out, "row, id, image, text, stars, weight, tag, typeof(stars), typeof(weight), typeof(tag)")
    assert [r[:2] for r in rows] == [(i, r["id"]) for i, r in enumerate(FORMAT_RECORDS)]
    for row, rec in zip(rows, FORMAT_RECORDS):
        assert row[2] == (str((format_dir / rec["image"]).resolve()) if rec["image"] else None)
        assert row[3] == rec["text"]
        assert row[4:7] == (rec["stars"], rec["weight"], rec["tag"])
        assert row[7:] == ("BIGINT", "DOUBLE", "VARCHAR")  # CSV numbers become numbers
    _, vectors = _store_vectors(out)
    np.testing.assert_allclose(vectors, _expected_vectors(format_dir, FORMAT_RECORDS), atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in vectors}) == 4
    assert _assert_manifest_matches_files(out)["complete"] is True


def test_image_folder_with_sidecar_captions(tmp_path):
    root = tmp_path / "pics"
    _noise_image(root / "a.png", 1)
    _noise_image(root / "b.png", 2, (30, 16))
    (root / "b.txt").write_text("a blue square\n", encoding="utf-8")
    jpg = root / "sub" / "c.jpg"
    jpg.parent.mkdir()
    Image.fromarray(np.full((12, 40, 3), 200, np.uint8)).save(jpg)
    (root / "sub" / "c.txt").write_text("  grey stripe  ", encoding="utf-8")
    (root / "notes.md").write_text("not an image")
    out = tmp_path / "store"
    summary = encode_corpus(root, out, "test-tiny", batch_size=2, workers=0, part_size=2, progress=False)
    assert (summary.items, summary.encoded, summary.errors) == (3, 3, 0)
    rows = _store_rows(out, "row, id, image, text")
    assert rows == [(0, "a.png", str((root / "a.png").resolve()), None),
                    (1, "b.png", str((root / "b.png").resolve()), "a blue square"),
                    (2, "sub/c.jpg", str(jpg.resolve()), "grey stripe")]
    _, vectors = _store_vectors(out)
    expected = _encoder().encode(images=[root / "a.png", root / "b.png", jpg], texts=[None, "a blue square",
                                                                                   "grey stripe"])
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_jsonl_metadata_key_missing_from_first_record_is_kept(tmp_path):
    """Metadata keys may be absent from some records; a key first seen after record 1 must not be dropped."""
    lines = [{"id": "a", "text": "first item has no metadata"},
             {"id": "b", "text": "second", "split": "test", "n_objects": 3},
             {"id": "c", "text": "third", "split": "train"}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "store"
    encode_corpus(corpus, out, "test-tiny", batch_size=8, workers=0, progress=False)
    columns = [c for c, *_ in duckdb.sql(f"DESCRIBE SELECT * FROM {_parts(out)}").fetchall()]
    assert "split" in columns and "n_objects" in columns, columns
    assert _store_rows(out, "id, split, n_objects") == [("a", None, None), ("b", "test", 3), ("c", "train", None)]


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_manifest_with_utf8_bom_is_read(tmp_path, suffix):
    """Spreadsheet exports ("CSV UTF-8") start with a byte-order mark; it must not rename or break row 1."""
    path = tmp_path / f"corpus.{suffix}"
    if suffix == "csv":
        body = "id,text,stars\nfirst,hello there,1\nsecond,general kenobi,2\n"
    else:
        body = '{"id": "first", "text": "hello there", "stars": 1}\n{"id": "second", "text": "general kenobi", ' \
               '"stars": 2}\n'
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    out = tmp_path / "store"
    summary = encode_corpus(path, out, "test-tiny", batch_size=8, workers=0, progress=False)
    assert summary.errors == 0
    assert _store_rows(out, "id, text, stars") == [("first", "hello there", 1), ("second", "general kenobi", 2)]


# ---------------------------------------------------------------- 3. float16


def test_float16_store_is_readable_and_close_to_float32(shapes_corpus, shapes_store, tmp_path):
    out = tmp_path / "f16"
    proc = run_cli("encode", shapes_corpus, "--model", "test-tiny", "--out", out, "--dtype", "float16",
                   "--workers", "0", "--part-size", "128", "--batch-size", "64")
    assert "300 items encoded" in proc.stdout
    manifest = _assert_manifest_matches_files(out)
    assert manifest["dtype"] == "float16" and manifest["complete"] is True
    for part in out.glob("part-*.parquet"):
        assert pq.read_schema(part).field("embedding").type == pa.list_(pa.float16(), DIM)
    ids16, v16 = _store_vectors(out)
    ids32, v32 = _store_vectors(shapes_store)
    assert ids16 == ids32 and v16.shape == v32.shape == (300, DIM)
    assert duckdb.sql(f"SELECT count(*) FROM {_parts(out)} WHERE len(embedding) = {DIM}").fetchall()[0][0] == 300
    np.testing.assert_allclose(v16, v32, atol=1e-3)
    assert not np.array_equal(v16, v32)  # really rounded to half precision
    np.testing.assert_allclose(np.linalg.norm(v16, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(np.concatenate([v for _, v in EmbeddingStore(out).iter_batches()]), v16, atol=0)


# ---------------------------------------------------------------- 5. bad input

TRUNCATED, HUGE_SIDE, BOMB_SIDE = "img/half.png", 9000, 10000  # a real PNG cut in half
assert HUGE_SIDE * HUGE_SIDE > MAX_IMAGE_PIXELS > 0
assert BOMB_SIDE * BOMB_SIDE > Image.MAX_IMAGE_PIXELS  # PIL's own decompression-bomb check fires first


def _bad_corpus(root: Path) -> tuple[Path, list[str], dict[int, tuple[str, str]]]:
    """20 good items and 12 bad ones; returns (manifest, good ids, {position: (id, reason pattern)})."""
    root.mkdir(parents=True, exist_ok=True)
    good_png = _noise_image(root / "img" / "good-00.png", 0)
    (root / "img" / "corrupt.png").write_bytes(np.random.default_rng(7).bytes(600))
    data = good_png.read_bytes()
    (root / TRUNCATED).write_bytes(data[: len(data) // 2])
    (root / "img" / "empty.png").write_bytes(b"")
    Image.new("1", (HUGE_SIDE, HUGE_SIDE), 1).save(root / "img" / "huge.png")
    Image.new("1", (BOMB_SIDE, BOMB_SIDE), 0).save(root / "img" / "bomb.png")

    def good(i: int) -> bytes:
        rec: dict = {"id": f"good-{i:02d}", "kind": "good"}
        if i % 3 != 2:
            rec["image"] = f"img/good-{i:02d}.png"
            if i:
                _noise_image(root / rec["image"], i, (16 + i, 20))
        if i % 3 != 1:
            rec["text"] = f"good item number {i}"
        return (json.dumps(rec) + "\n").encode()

    def item(rid: str, **kw) -> bytes:
        return (json.dumps({"id": rid, **kw, "kind": "bad"}) + "\n").encode()

    bad: dict[int, tuple[bytes, str, str]] = {
        1: (item("bad-missing", image="img/not-there.png", text="x"), "bad-missing", r"^image not found: .*not-there"),
        8: (item("bad-corrupt", image="img/corrupt.png"), "bad-corrupt", r"^cannot decode image\b.*corrupt\.png"),
        9: (item("bad-truncated", image=TRUNCATED), "bad-truncated",
            r"^cannot decode image\b(?=.*half\.png)(?=.*truncated)"),
        10: (item("bad-empty-file", image="img/empty.png"), "bad-empty-file", r"^empty image file: "),
        11: (item("bad-huge", image="img/huge.png"), "bad-huge",
             rf"^image too large: {HUGE_SIDE}x{HUGE_SIDE} pixels > limit {MAX_IMAGE_PIXELS}"),
        12: (b'{"id": "bad-json", "text": "no closing brace"\n', "12",
             r"^broken manifest row \(line 13\): invalid JSON"),
        13: (item("good-03", text="a second item with the same id"), "good-03",
             r"^duplicate id\b.*'good-03'.*first at position 4"),
        14: (item("bad-empty-text", text="   "), "bad-empty-text", r"^empty text and no image$"),
        15: (item("bad-long", text="x" * (MAX_TEXT_CHARS + 1)), "bad-long",
             rf"^text too long: {MAX_TEXT_CHARS + 1} characters > limit {MAX_TEXT_CHARS}"),
        17: (b'{"id": "bad-utf8", "text": "caf\xff\xfe au lait", "kind": "bad"}\n', "bad-utf8",
             r"^text is not valid UTF-8$"),
        18: (item("bad-neither"), "bad-neither", r"^item has neither image nor text$"),
        19: (item("bad-bomb", image="img/bomb.png", text="big"), "bad-bomb",
             r"^image too large \(decompression bomb\)"),
    }
    lines, goods = [], []
    for position in range(32):
        if position in bad:
            lines.append(bad[position][0])
        else:
            lines.append(good(len(goods)))
            goods.append(f"good-{len(goods):02d}")
    manifest = root / "corpus.jsonl"
    manifest.write_bytes(b"".join(lines))
    return manifest, goods, {p: (rid, pattern) for p, (_, rid, pattern) in bad.items()}


# reason kinds as the summary should count them: one line per kind, without paths or ids
BAD_KINDS = {"image not found": 1, "cannot decode image": 2, "empty image file": 1, "image too large": 2,
             "broken manifest row": 1, "duplicate id": 1, "empty text and no image": 1, "text too long": 1,
             "text is not valid UTF-8": 1, "item has neither image nor text": 1}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    manifest, goods, bad = _bad_corpus(root / "corpus")
    out = root / "store"
    proc = run_cli("encode", manifest, "--model", "test-tiny", "--out", out, "--workers", "0",
                   "--batch-size", "4", "--part-size", "8")
    return manifest, goods, bad, out, proc


def test_bad_items_are_reported_and_good_items_all_kept(bad_run):
    manifest, goods, bad, out, proc = bad_run
    assert len(goods) == 20 and len(bad) == 12 and sum(BAD_KINDS.values()) == 12
    assert _summary_first_line(proc.stdout) == f"store {out}: 20 items encoded, 12 skipped (32 in the corpus)"
    skipped = [re.fullmatch(r"  skipped: (\d+) × (.+)", ln) for ln in proc.stdout.splitlines()
               if ln.startswith("  skipped:")]
    assert all(skipped) and sum(int(m.group(1)) for m in skipped) == 12, proc.stdout

    errors = _errors(out)
    assert [p for p, _, _ in errors] == sorted(bad)  # each bad item once, in corpus order
    for position, rid, reason in errors:
        expected_id, pattern = bad[position]
        assert rid == expected_id
        assert re.search(pattern, reason), (position, rid, reason)
    utf8_text = duckdb.sql(f"SELECT text FROM read_parquet({_q(out / 'errors.parquet')}) WHERE id = 'bad-utf8'")
    assert "\ufffd" in utf8_text.fetchall()[0][0]  # kept storable, the bad bytes marked

    rows = _assert_dense_unique(out, goods)
    assert [i for _, i in rows] == goods
    assert duckdb.sql(f"SELECT DISTINCT kind FROM {_parts(out)}").fetchall() == [("good",)]
    assert _store_rows(out, "text")[3] == ("good item number 3",)  # the first good-03, not its duplicate
    manifest_json = _assert_manifest_matches_files(out)
    assert (manifest_json["count"], manifest_json["errors"], manifest_json["complete"]) == (20, 12, True)
    assert manifest_json["parts"][1]["count"] == 0  # positions 8..15 are all bad: an empty part, no file

    # the good vectors are those of a direct forward pass
    records = []
    for ln in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    records = [r for r in records if r["kind"] == "good"]
    assert [r["id"] for r in records] == goods
    _, vectors = _store_vectors(out)
    expected = _encoder().encode(images=[manifest.parent / r["image"] if "image" in r else None for r in records],
                                 texts=[r.get("text") for r in records])
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_summary_counts_skipped_items_by_kind(bad_run):
    """'skipped: N × kind' lines group reasons by kind: no file paths or ids split one kind into many lines."""
    _, _, _, _, proc = bad_run
    kinds = {m.group(2): int(m.group(1)) for m in (re.fullmatch(r"  skipped: (\d+) × (.+)", ln)
                                                   for ln in proc.stdout.splitlines()) if m}
    assert kinds == BAD_KINDS, proc.stdout


def test_strict_stops_at_the_first_bad_item(bad_run, tmp_path):
    manifest, _, _, out, _ = bad_run
    proc = run_cli("encode", manifest, "--model", "test-tiny", "--out", tmp_path / "strict", "--workers", "2",
                   "--batch-size", "4", "--part-size", "8", "--strict", check=False)
    line = _single_error_line(proc, only_line=False)  # the progress bar may also be on stderr
    assert "'bad-missing'" in line and "image not found" in line, line
    assert not (_manifest(tmp_path / "strict") or {}).get("complete")

    # --strict on the finished non-strict store of the same job names its first recorded error
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(RetrievalError, match=r"^--strict: item 'bad-missing': image not found"):
        encode_corpus(manifest, copy, "test-tiny", batch_size=4, workers=0, part_size=8, strict=True, progress=False)
    assert _file_digests(copy) == _file_digests(out)


# ---------------------------------------------------------------- 6. unusable corpus or output paths


def _unusable(kind: str, tmp_path: Path) -> tuple[Path, str]:
    if kind == "missing file":
        return tmp_path / "nope.jsonl", "corpus not found"
    if kind == "missing folder":
        return tmp_path / "no-such-folder", "corpus not found"
    if kind == "unsupported suffix":
        (tmp_path / "corpus.txt").write_text('{"id": "a", "text": "b"}\n')
        return tmp_path / "corpus.txt", "unsupported corpus"
    if kind == "folder without images":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.txt").write_text("hi")
        return tmp_path / "empty", "no images"
    if kind == "corrupt parquet":
        (tmp_path / "c.parquet").write_bytes(b"PAR1" + bytes(100))
        return tmp_path / "c.parquet", "cannot read corpus"
    if kind == "empty jsonl":
        (tmp_path / "e.jsonl").write_text("\n\n")
        return tmp_path / "e.jsonl", "has no rows"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing file", "unsupported suffix", "missing folder", "folder without images",
                                  "corrupt parquet", "empty jsonl"])
def test_unusable_corpus_is_one_error_line(kind, tmp_path):
    corpus, words = _unusable(kind, tmp_path)
    if kind in ("missing file", "unsupported suffix"):  # the real CLI; the others in-process (same code path)
        line = _single_error_line(run_cli("encode", corpus, "--model", "test-tiny", "--out", tmp_path / "s",
                                          check=False))
        assert words in line and str(corpus.name) in line, line
    else:
        with pytest.raises(RetrievalError, match=words):
            encode_corpus(corpus, tmp_path / "s", "test-tiny", workers=0, progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kind", ["non-empty folder", "a file"])
def test_unusable_out_is_one_error_line(kind, shapes_corpus, tmp_path):
    out = tmp_path / "out"
    if kind == "a file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "precious.txt").write_text("precious")
    if kind == "a file":  # the real CLI
        proc = run_cli("encode", shapes_corpus, "--model", "test-tiny", "--out", out, "--workers", "0", check=False)
        assert str(out) in _single_error_line(proc)
    else:
        with pytest.raises(RetrievalError, match="exists and is not an embedding store"):
            encode_corpus(shapes_corpus, out, "test-tiny", workers=0, progress=False)
    assert (out.read_text() if kind == "a file" else (out / "precious.txt").read_text()) == "precious"
    if kind != "a file":
        assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_manifest_image_paths_are_absolute_and_normalised(tmp_path):
    """A manifest in a subfolder that points up (`../images/a.png`, as task galleries do) gives a plain path."""
    from retrieval.corpus import read_corpus

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / "a.png")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gallery.jsonl").write_text('{"id": "a", "image": "../images/a.png"}\n')
    image = read_corpus(tmp_path / "tasks" / "gallery.jsonl").table.column("image")[0].as_py()
    assert image == str((tmp_path / "images" / "a.png").resolve())
