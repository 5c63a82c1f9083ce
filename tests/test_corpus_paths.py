"""Which files a corpus reads: nothing through a symlink that leaves its root (unless --follow-symlinks), nothing
outside a manifest's folder with --root-only, a sidecar text only up to the limit; and a CSV whose stray quote
would swallow the rows after it is reported, with those rows still read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from conftest import run_cli
from PIL import Image

from retrieval.corpus import MAX_TEXT_CHARS, read_corpus
from retrieval.encode import encode_corpus
from retrieval.paths import PathPolicy, PathRefused

SECRET = "top-secret-line-7d1e"


def image(path: Path, colour: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), colour).save(path)
    return path


def store_values(store: Path, column: str) -> list:
    return [r[0] for r in duckdb.sql(f"SELECT {column} FROM '{store}/part-*.parquet' ORDER BY row").fetchall()]


def errors(store: Path) -> dict[str, str]:
    return dict(duckdb.sql(f"SELECT id, error FROM '{store}/errors.parquet'").fetchall())


@pytest.fixture
def linked_folder(tmp_path) -> tuple[Path, Path]:
    """corpus/ with a real image and caption, an image and a caption linked from outside, a link that stays
    inside, a linked folder from outside and a link loop; outside/ holds the targets."""
    outside, root = tmp_path / "outside", tmp_path / "corpus"
    image(outside / "elsewhere.png", "blue")
    image(outside / "folder" / "deep.png", "green")
    (outside / "shadow.txt").write_text(SECRET + "\n")
    image(root / "plain.png", "red")
    (root / "plain.txt").write_text("a red square")
    image(root / "captioned.png", "yellow")
    (root / "captioned.txt").symlink_to(outside / "shadow.txt")
    (root / "linked.png").symlink_to(outside / "elsewhere.png")
    (root / "alias.png").symlink_to(root / "plain.png")
    (root / "sub").mkdir()
    (root / "sub" / "far").symlink_to(outside / "folder", target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    return root, outside


def test_folder_corpus_refuses_links_out_of_its_root(linked_folder, tmp_path):
    root, _ = linked_folder
    out = tmp_path / "store"
    summary = encode_corpus(root, out, "test-tiny", workers=0, progress=False)
    assert store_values(out, "id") == ["alias.png", "plain.png"]
    assert store_values(out, "text") == [None, "a red square"]
    refused = errors(out)
    assert set(refused) == {"captioned.png", "linked.png"}
    assert refused["captioned.png"].startswith("sidecar text refused: symlink leads out of the corpus root")
    assert refused["linked.png"].startswith("image refused: symlink leads out of the corpus root")
    assert summary.errors == 2
    everything = json.dumps(duckdb.sql(f"SELECT * FROM '{out}/errors.parquet'").fetchall()) + \
        json.dumps(store_values(out, "text"))
    assert SECRET not in everything


@pytest.mark.slow
def test_follow_symlinks_reads_them_and_enters_linked_folders_once(linked_folder, tmp_path):
    root, _ = linked_folder
    out = tmp_path / "store"
    proc = run_cli("encode", root, "--model", "test-tiny", "--out", out, "--workers", "0", "--follow-symlinks")
    assert "0 skipped" in proc.stdout
    ids = store_values(out, "id")
    assert ids == ["alias.png", "captioned.png", "linked.png", "plain.png", "sub/far/deep.png"]
    assert store_values(out, "text")[1] == SECRET
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus"]["paths"]["follow_symlinks"] is True
    proc = run_cli("encode", root, "--model", "test-tiny", "--out", out, "--workers", "0", check=False)
    assert proc.returncode == 2 and "symlink and root rules" in proc.stderr


@pytest.fixture
def manifest_corpus(tmp_path) -> Path:
    """A manifest in data/ naming an image beside it, one in ../, one by absolute path, one linked from outside."""
    data = tmp_path / "data"
    image(data / "here.png", "red")
    up = image(tmp_path / "up.png", "green")
    far = image(tmp_path / "far" / "abs.png", "blue")
    (data / "link.png").symlink_to(far)
    rows = [{"id": "here", "image": "here.png"}, {"id": "up", "image": "../up.png"},
            {"id": "abs", "image": str(far)}, {"id": "link", "image": "link.png"}]
    assert up.exists()
    (data / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data / "m.jsonl"


@pytest.mark.parametrize("flags, kept, refused", [
    ([], ["here", "up", "abs"], {"link": "symlink leads out"}),
    pytest.param(["--follow-symlinks"], ["here", "up", "abs", "link"], {}, marks=pytest.mark.slow),
    pytest.param(["--root-only"], ["here"], {"up": "outside the corpus root", "abs": "outside the corpus root",
                                             "link": "symlink leads out"}, marks=pytest.mark.slow),
    pytest.param(["--root-only", "--follow-symlinks"], ["here", "link"], {"up": "outside the corpus root",
                                                                         "abs": "outside the corpus root"},
                 marks=pytest.mark.slow),
])
def test_manifest_paths_outside_its_folder(manifest_corpus, tmp_path, flags, kept, refused):
    out = tmp_path / "store"
    run_cli("encode", manifest_corpus, "--model", "test-tiny", "--out", out, "--workers", "0", *flags)
    assert store_values(out, "id") == kept
    found = errors(out)
    assert set(found) == set(refused)
    for item, reason in refused.items():
        assert found[item].startswith("image refused: ") and reason in found[item]


def test_a_path_swapped_for_a_link_after_the_check_is_still_refused(tmp_path, monkeypatch):
    """open_file checks the file it really opened, so a link swapped in after the path check does not get
    through (the check is made to miss the link here, as a race would)."""
    root = tmp_path / "root"
    (root).mkdir()
    (tmp_path / "secret.txt").write_text(SECRET)
    (root / "a.txt").symlink_to(tmp_path / "secret.txt")
    policy = PathPolicy.for_root(root)
    real_realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p: p if str(p).endswith("a.txt") else real_realpath(p))
    if not os.path.islink("/proc/self/fd/0"):
        pytest.skip("no /proc/self/fd here")
    with pytest.raises(PathRefused, match="symlink leads out of the corpus root"):
        policy.open_file(root / "a.txt")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(PathRefused, match="not a regular file"):
        PathPolicy.for_root(tmp_path).open_file(tmp_path / "pipe.png")


def test_a_huge_sidecar_is_read_only_up_to_the_limit(tmp_path):
    root = tmp_path / "corpus"
    image(root / "a.png", "red")
    image(root / "b.png", "blue")
    (root / "b.txt").write_text("a blue square")
    with open(root / "a.txt", "wb") as f:  # 400 MB, sparse: costs no disk
        f.truncate(400 * 2**20)
    script = ("import re; from retrieval.corpus import read_corpus; "  # VmHWM: this process's own peak
              f"c = read_corpus({str(root)!r}); print(c.table.num_rows, c.table['error'][0].as_py()); "
              "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rows_and_reason, peak_mb = proc.stdout.strip().splitlines()
    assert rows_and_reason == f"2 text too long: a.txt has more than {MAX_TEXT_CHARS} characters"
    assert int(peak_mb) < 300, f"reading a 400 MB sidecar took {peak_mb} MB"

    out = tmp_path / "store"
    encode_corpus(root, out, "test-tiny", workers=0, progress=False)
    assert store_values(out, "id") == ["b.png"]
    text, = [r[0] for r in duckdb.sql(f"SELECT text FROM '{out}/errors.parquet'").fetchall()]
    assert len(text) == 201 and text == "\0" * 200 + "…"
    assert (out / "errors.parquet").stat().st_size < 20_000


def test_huge_manifest_text_is_kept_as_an_excerpt_in_errors(tmp_path):
    image(tmp_path / "a.png", "red")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "text": "x" * 300_000}) + "\n"
                                      + json.dumps({"id": "b", "text": "fine"}) + "\n")
    out = tmp_path / "store"
    encode_corpus(tmp_path / "m.jsonl", out, "test-tiny", workers=0, progress=False)
    (text, error), = duckdb.sql(f"SELECT text, error FROM '{out}/errors.parquet'").fetchall()
    assert error == f"text too long: 300000 characters > limit {MAX_TEXT_CHARS}" and len(text) < 300


CSV_ROWS = [f"item{i},img{i}.png,caption {i}" for i in range(10)]


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("id,image,text\n" + "\n".join(rows) + "\n")
    for i in range(10):
        image(path.parent / f"img{i}.png", "red")
    return path


@pytest.mark.parametrize("broken_at", [0, 3, 9])
def test_an_unterminated_quote_is_reported_and_the_rows_after_it_are_read(tmp_path, broken_at):
    rows = list(CSV_ROWS)
    rows[broken_at] = f'item{broken_at},img{broken_at}.png,"caption {broken_at} with a quote left open'
    corpus = read_corpus(write_csv(tmp_path / "m.csv", rows))
    table = corpus.table.to_pylist()
    assert [r["id"] for r in table if r["error"] is None] == [f"item{i}" for i in range(10) if i != broken_at]
    bad = [r for r in table if r["error"] is not None]
    assert len(bad) == 1 and bad[0]["error"] == \
        f"broken manifest row (line {broken_at + 2}): a quote left open runs on to the end of the file"


def test_a_quote_that_closes_on_the_next_row_is_caught_by_its_look(tmp_path):
    rows = list(CSV_ROWS)
    rows[3] = 'item3,img3.png,"caption 3 left open'
    rows[4] = 'item4,img4.png,caption 4"'  # closes the field: one well-formed record over two lines
    table = read_corpus(write_csv(tmp_path / "m.csv", rows)).table.to_pylist()
    assert [r["id"] for r in table if r["error"] is None] == [f"item{i}" for i in range(10) if i != 3]
    bad, = [r["error"] for r in table if r["error"] is not None]
    assert bad == "broken manifest row (line 5): a quote left open runs on into 1 more line"


def test_a_quote_closed_rows_later_does_not_swallow_them(tmp_path):
    rows = list(CSV_ROWS)
    rows[2] = 'item2,img2.png,"caption 2 left open'
    rows[6] = 'item6,img6.png,"a caption, with a comma"'
    table = read_corpus(write_csv(tmp_path / "m.csv", rows)).table.to_pylist()
    assert [r["id"] for r in table if r["error"] is None] == [f"item{i}" for i in range(10) if i != 2]
    assert [r["text"] for r in table if r["id"] == "item6"] == ["a caption, with a comma"]


def test_a_quoted_multi_line_caption_is_kept(tmp_path):
    rows = list(CSV_ROWS)
    rows[4] = 'item4,img4.png,"first line of a caption\nand its second line"'
    table = read_corpus(write_csv(tmp_path / "m.csv", rows)).table.to_pylist()
    assert all(r["error"] is None for r in table) and len(table) == 10
    assert table[4]["text"] == "first line of a caption\nand its second line"


def test_a_field_over_the_csv_size_limit_is_one_broken_row(tmp_path):
    rows = list(CSV_ROWS)
    rows[5] = 'item5,img5.png,"' + "y" * 200_000 + '"'
    table = read_corpus(write_csv(tmp_path / "m.csv", rows)).table.to_pylist()
    assert [r["id"] for r in table if r["error"] is None] == [f"item{i}" for i in range(10) if i != 5]
    bad, = [r["error"] for r in table if r["error"] is not None]
    assert bad.startswith("broken manifest row (line 7): field larger than field limit")



def test_a_file_name_that_is_not_utf8_is_one_skipped_item(tmp_path):
    root = tmp_path / "corpus"
    image(root / "fine.png", "red")
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    Image.new("RGB", (12, 12), "blue").save(root / name, format="PNG")
    out = tmp_path / "store"
    encode_corpus(root, out, "test-tiny", workers=0, progress=False)
    assert store_values(out, "id") == ["fine.png"]
    assert list(errors(out).values()) == ["id is not valid UTF-8"]


@pytest.mark.parametrize("columns, fragment", [
    ({"id": "a", "text": "t", "ROW": 3}, "column 'row' is reserved"),
    ({"id": "a", "text": "t", "Text": "x"}, "differ only in case"),
    ({"id": "a", "text": "t", "\u0000read error": {"x": 1}}, "holds control characters"),
    ({"id": "a", "text": "t", "": 1}, "is empty or holds control characters"),
])
def test_column_names_that_sql_cannot_tell_apart_are_refused(columns, fragment, tmp_path):
    from retrieval import RetrievalError

    (tmp_path / "m.jsonl").write_text(json.dumps(columns) + "\n")
    with pytest.raises(RetrievalError, match=fragment):
        read_corpus(tmp_path / "m.jsonl")


@pytest.mark.parametrize("header, fragment", [
    ("id,text,text", "names column 'text' twice"),
    ("", "has no header row"),
    ("id,,text", "a column without a name"),
])
def test_a_csv_header_that_loses_columns_is_refused(header, fragment, tmp_path):
    from retrieval import RetrievalError

    (tmp_path / "m.csv").write_text(header + "\na,b,c\n")
    with pytest.raises(RetrievalError, match=fragment):
        read_corpus(tmp_path / "m.csv")


def test_csv_numbers_are_only_what_people_write_as_numbers(tmp_path):
    (tmp_path / "m.csv").write_text("id,text,count,code,ratio,odd\n"
                                    "a,x,12,007,0.5,1_000\nb,y,-3,12,1e-3, 12 \nc,z,0,3,2,nan\n")
    table = read_corpus(tmp_path / "m.csv").table.to_pydict()
    assert table["count"] == [12, -3, 0]
    assert table["code"] == ["007", "12", "3"]  # a leading zero makes it a code, not a number
    assert table["ratio"] == [0.5, 0.001, 2.0]
    assert table["odd"] == ["1_000", " 12 ", "nan"]


@pytest.mark.slow
def test_search_json_has_no_nan(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["a red circle", "a blue square"],
                             "weight": [float("nan"), 1.5]}), tmp_path / "m.parquet")
    run_cli("index", "build", tmp_path / "m.parquet", "--model", "test-tiny", "--out", tmp_path / "idx",
            "--workers", "0")
    out = run_cli("search", "--index", tmp_path / "idx", "--text", "a red circle", "--json").stdout
    hits = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))
    assert {h["id"]: h["weight"] for h in hits} == {"a": None, "b": 1.5}


def test_values_parquet_cannot_hold_as_they_are_are_kept_as_text(tmp_path):
    """An integer past int64 (CSV or JSONL) and an object that is {} in every row are stored as their text."""
    (tmp_path / "m.csv").write_text("id,text,big\na,x,99999999999999999999999\nb,y,3\n")
    assert read_corpus(tmp_path / "m.csv").table["big"].to_pylist() == ["99999999999999999999999", "3"]
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "x", "big": 99999999999999999999999, "v": {}}\n'
                                      '{"id": "b", "text": "y", "big": 3, "v": {}}\n')
    out = tmp_path / "store"
    encode_corpus(tmp_path / "m.jsonl", out, "test-tiny", workers=0, progress=False)
    assert store_values(out, "big") == ["99999999999999999999999", "3"] and store_values(out, "v") == ["{}", "{}"]
