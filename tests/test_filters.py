"""`where` filters are one predicate over the store's columns and nothing more: hostile filters read no file,
write none, load nothing and say nothing of what they tried to read; ordinary SQL predicates still work.

Each hostile payload goes through the Python API (`open_index(...).search(where=...)`, as a server would call
it) on a real index of the session store; the first few also through the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

import retrieval
from retrieval import RetrievalError
from retrieval.indexing import build_index_folder

SECRET = "s3cret-9f1c2e-do-not-print"


@pytest.fixture(scope="module")
def sandbox(shapes_store, tmp_path_factory):
    """An index of the session store, a secret file, and a folder no filter may write into."""
    root = tmp_path_factory.mktemp("filters")
    build_index_folder(shapes_store, root / "index", progress=False)
    secret = root / "secret.txt"
    secret.write_text(SECRET + "\n")
    (root / "out").mkdir()
    return root / "index", secret, root / "out"


def payloads(secret: Path, out: Path) -> dict[str, str]:
    """Name → a filter that tries to get out of the predicate."""
    s, o = str(secret), str(out)
    breakout = "1=1); {}; SELECT row FROM store WHERE (1=1"
    return {
        "subquery file read": f"(SELECT content FROM read_text('{s}')) LIKE '%s3cret%'",
        "subquery file read in a function": f"length((SELECT content FROM read_text('{s}'))) > 0",
        "csv read": f"id IN (SELECT * FROM read_csv('{s}'))",
        "glob": f"(SELECT count(*) FROM glob('{Path(s).parent}/*')) > 0",
        "COPY breakout": breakout.format(f"COPY store TO '{o}/stolen.csv'"),
        "COPY breakout with comment": f"1=1); COPY store TO '{o}/stolen2.csv' --",
        "ATTACH breakout": breakout.format(f"ATTACH '{o}/new.db' AS x"),
        "INSTALL breakout": breakout.format("INSTALL httpfs"),
        "LOAD breakout": breakout.format("LOAD httpfs"),
        "SET breakout": breakout.format("SET enable_external_access = true"),
        "PRAGMA breakout": breakout.format("PRAGMA database_list"),
        "UNION": f"1=1) UNION SELECT 1 FROM read_text('{s}') WHERE (1=1",
        "ORDER BY breakout": "1=1) ORDER BY (1",
        "second statement": f"split = 'test'; COPY store TO '{o}/stolen3.csv'",
        "query()": f"(SELECT count(*) FROM query('SELECT * FROM read_text(''{s}'')')) > 0",
        "scalar read_text": f"read_text('{s}') IS NOT NULL",
        "settings": "current_setting('temp_directory') <> ''",
        "huge value": "list_sum(range(0, 100000000)) > 0",
        "window": "row_number() OVER () > 1",
    }


def assert_nothing_leaked(message: str, out: Path) -> None:
    assert SECRET not in message and "s3cret" not in message.replace("'%s3cret%'", "")
    assert list(out.iterdir()) == [], "a filter wrote a file"


@pytest.fixture(scope="module")
def index(sandbox):
    return retrieval.open_index(sandbox[0], device="cpu")


@pytest.mark.parametrize("name", list(payloads(Path("s"), Path("o"))))
def test_hostile_filter_is_refused_through_the_python_api(name, index, sandbox):
    _, secret, out = sandbox
    where = payloads(secret, out)[name]
    with pytest.raises(RetrievalError, match="^invalid --where filter") as refused:
        index.search(text="a red circle", k=5, where=where)
    assert_nothing_leaked(str(refused.value), out)
    assert "\n" not in str(refused.value)


SLOW_BREAKOUTS = ("glob", "COPY breakout", "ATTACH breakout", "INSTALL breakout")  # all in the Python API test


@pytest.mark.parametrize("name", ["subquery file read", *(pytest.param(n, marks=pytest.mark.slow)
                                                          for n in SLOW_BREAKOUTS)])
def test_hostile_filter_is_one_error_line_from_the_cli(name, sandbox):
    index, secret, out = sandbox
    proc = run_cli("search", "--index", index, "--text", "a red circle", "--where",
                   payloads(secret, out)[name], check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid --where filter"), proc.stderr
    assert_nothing_leaked(proc.stderr, out)


def test_the_sandbox_itself_refuses_files_even_past_the_parser(sandbox):
    """Defence in depth: were a payload to get past the predicate check, the connection reads no file."""
    import duckdb

    from retrieval.filters import SANDBOX

    _, secret, out = sandbox
    con = duckdb.connect(config=SANDBOX)
    for statement in (f"SELECT * FROM read_text('{secret}')", f"COPY (SELECT 1) TO '{out}/x.csv'",
                      f"ATTACH '{out}/x.db'", "SET enable_external_access = true", "INSTALL httpfs"):
        with pytest.raises(duckdb.Error) as refused:
            con.execute(statement).fetchall()
        assert SECRET not in str(refused.value)
    assert list(out.iterdir()) == []


ORDINARY = {  # filter → the same predicate over a corpus record, in Python
    "split = 'test'": lambda r: r["split"] == "test",
    "n_objects BETWEEN 2 AND 3 AND split IN ('train', 'val')":
        lambda r: 2 <= r["n_objects"] <= 3 and r["split"] in ("train", "val"),
    "id LIKE 'shapes-0001%'": lambda r: r["id"].startswith("shapes-0001"),
    "regexp_matches(shapes, '^cross')": lambda r: r["shapes"].startswith("cross"),
    "list_contains(string_split(colours, ' '), 'red')": lambda r: "red" in r["colours"].split(" "),
    "len(list_filter(string_split(shapes, ' '), lambda s: s = 'star')) > 0": lambda r: "star" in r["shapes"].split(),
    "CASE WHEN n_objects > 2 THEN background = 'gray' ELSE false END":
        lambda r: r["n_objects"] > 2 and r["background"] == "gray",
    "CAST(n_objects AS VARCHAR) = '1' OR lower(text) LIKE '%yellow%'":
        lambda r: r["n_objects"] == 1 or "yellow" in r["text"].lower(),
}


@pytest.mark.parametrize("where", list(ORDINARY))
def test_ordinary_predicates_still_filter_exactly(where, index, shapes_corpus):
    records = [json.loads(line) for line in shapes_corpus.read_text().splitlines() if line.strip()]
    expected = [i for i, r in enumerate(records) if ORDINARY[where](r)]
    assert 0 < len(expected) < len(records)
    assert index.filter_rows(where).tolist() == expected


def test_a_filter_that_runs_too_long_is_stopped(monkeypatch):
    import pyarrow as pa

    import retrieval.filters as filters

    table = pa.table({"row": pa.array(range(4_000_000), pa.int64()),
                      "text": pa.array(["a picture of a large yellow cross"] * 4_000_000)})
    assert filters.filter_rows(table.slice(0, 10), "regexp_matches(text, 'y.*w.*c')").tolist() == list(range(10))
    monkeypatch.setattr(filters, "FILTER_SECONDS", 0.01)
    with pytest.raises(RetrievalError, match="took longer than 0.01 s and was stopped"):
        filters.filter_rows(table, "regexp_matches(text || text, 'y.*w.*c.*q') OR length(text || text) > 10000")


def test_a_filter_that_grows_without_bound_is_stopped_by_the_memory_limit(sandbox, monkeypatch):
    """Nested replace() grows each caption by its length per space; an edit distance over that is quadratic.
    DuckDB's own memory limit does not see it: the filter child's limit does, and the searcher lives on."""
    import resource

    import retrieval.filter_worker as filter_worker

    monkeypatch.setattr(filter_worker, "FILTER_MEMORY", 300 * 2**20)
    searcher = retrieval.open_index(sandbox[0], device="cpu")
    grown = "substr(replace(replace(text, ' ', text), ' ', text), 1, 30000)"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RetrievalError, match="needed more memory than a filter may use"):
        searcher.filter_rows(f"damerau_levenshtein({grown}, {grown}) > 0")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 2**10  # KiB: not in this process
    assert len(searcher.filter_rows("split = 'test'")) > 0


def test_a_module_in_the_working_folder_cannot_take_the_filter_child(sandbox, tmp_path, monkeypatch):
    """The child starts isolated (-I): a duckdb.py where the user stands is not imported in place of DuckDB."""
    (tmp_path / "duckdb.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\nraise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    searcher = retrieval.open_index(sandbox[0], device="cpu")
    assert len(searcher.filter_rows("split = 'test'")) > 0
    assert not (tmp_path / "ran").exists()


def test_an_interrupted_filter_does_not_answer_the_next_one(sandbox, shapes_corpus):
    """Interrupted while its child works (a signal here; Ctrl-C or a server's timeout alike), the next filter
    still gets its own rows, not the interrupted one's."""
    import signal

    records = [json.loads(line) for line in shapes_corpus.read_text().splitlines() if line.strip()]
    searcher = retrieval.open_index(sandbox[0], device="cpu")
    grown = "substr(replace(replace(text, ' ', text), ' ', text), 1, 2500)"

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            searcher.filter_rows(f"levenshtein({grown}, {grown}) > 0")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    for split in ("test", "val"):
        assert searcher.filter_rows(f"split = '{split}'").tolist() == \
            [i for i, r in enumerate(records) if r["split"] == split]


@pytest.mark.parametrize("arguments, fragment", [
    ({"text": 5}, "query text must be a string"),
    ({"image": 5}, "query image must be a path or a PIL image"),
    ({"text": "red", "k": True}, "k must be a positive integer"),
    ({"text": "red", "where": ["split = 'test'"]}, "must be a string, not list"),
    ({"text": "red", "where": b"split = 'test'"}, "must be a string, not bytes"),
])
def test_python_api_arguments_of_the_wrong_type_are_one_clear_error(arguments, fragment, index):
    with pytest.raises(RetrievalError, match=fragment):
        index.search(**arguments)
