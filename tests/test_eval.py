"""`retrieval eval`: oracles and random models on generated data, fusion modes, task selection, the embedding cache
and the command line end to end. The metrics are tested in test_eval_metrics.py, task files and scoring in
test_eval_scoring.py."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from evaluation import report
from evaluation.digits import make_digits
from evaluation.evaluate import EmbeddingCache, evaluate_task, fusion_modes, run_eval, score_task, select_tasks
from evaluation.shapesworld import make_shapesworld
from evaluation.tasks import Item, Query, Task, list_tasks, read_task
from retrieval.encoders.registry import get_config
from retrieval.encoders.test_tiny import TinyTestEncoder
from retrieval.errors import RetrievalError

# every task the two generators write, in dataset.json order; a new task must be added here to be tested
SHAPES_TASKS = ["t2i", "i2t", "tgit", "tgit-pool", "vqa", "pos"]
DIGITS_TASKS = ["zeroshot", "t2i", "i2t"]
ALL_TASKS = [("shapesworld", t) for t in SHAPES_TASKS] + [("digits", t) for t in DIGITS_TASKS]
COMPOSED = {"tgit", "tgit-pool", "vqa", "pos"}  # queries with an image and a text
KS = (1, 2, 5, 10)

# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, Path]:
    """Small ShapesWorld and Digits benchmark folders, made once for this module."""
    root = tmp_path_factory.mktemp("evaldata")
    shapes = make_shapesworld(root / "shapes", n=300, size=32, train_pairs=False, progress=False).parent
    digits = make_digits(root / "digits", n=300, size=32, train_pairs=False, progress=False).parent
    return {"shapesworld": shapes, "digits": digits}


@pytest.fixture(scope="module")
def tasks(data_dirs) -> dict[tuple[str, str], Task]:
    return {(ds, name): read_task(data_dirs[ds] / "tasks" / name) for ds, name in ALL_TASKS}


def tiny(cls: type[TinyTestEncoder] = TinyTestEncoder) -> TinyTestEncoder:
    """The test-tiny encoder built as load_encoder builds it (seeded init, CPU), as an instance of `cls`."""
    config = get_config("test-tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = cls.build_model(config)
    return cls(config, model, device="cpu")


@pytest.fixture(scope="module")
def tiny_report(data_dirs) -> dict:
    return run_eval("all", "test-tiny", data=[data_dirs["shapesworld"], data_dirs["digits"]], device="cpu",
                    progress=False)


def _aggregate(task: Task, per_query: list[float]) -> float:
    """What score_task should report: the mean over types for a by_type task, else the mean over queries."""
    types = [q.type for q in task.queries]
    if task.by_type and any(t is not None for t in types):
        groups: dict[str, list[float]] = {}
        for t, v in zip(types, per_query):
            groups.setdefault(t, []).append(v)
        return float(np.mean([np.mean(v) for v in groups.values()]))
    return float(np.mean(per_query))


def _n_candidates(task: Task, q: Query) -> int:
    return len(q.candidates) if q.candidates is not None else len(task.candidates)


# ---------------------------------------------------------------------------------------------- 3. oracles


def test_generated_tasks_are_the_known_ones(data_dirs):
    for ds, names in (("shapesworld", SHAPES_TASKS), ("digits", DIGITS_TASKS)):
        meta = json.loads((data_dirs[ds] / "dataset.json").read_text())
        assert list(meta["tasks"]) == names
        assert sorted(list_tasks(data_dirs[ds])) == sorted(names)


def _oracle(task: Task, sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Identity one-hot candidates; each query the normalised sum of its positives' one-hots."""
    index = task.candidate_index()
    cands = np.eye(len(task.candidates), dtype=np.float32)
    queries = np.zeros((len(task.queries), len(task.candidates)), np.float32)
    for i, q in enumerate(task.queries):
        queries[i, [index[p] for p in q.positives]] = sign / math.sqrt(len(q.positives))
    return queries, cands


@pytest.mark.parametrize(("dataset", "name"), ALL_TASKS, ids=[f"{d}/{t}" for d, t in ALL_TASKS])
def test_oracle_is_perfect(tasks, dataset, name):
    task = tasks[dataset, name]
    res = score_task(task, *_oracle(task), ks=KS)
    m = res["metrics"]
    assert m["top1"] == 1.0 and m["mrr"] == 1.0
    assert all(m[f"hit@{k}"] == 1.0 for k in KS)
    assert max(len(q.positives) for q in task.queries) <= max(KS)
    assert m[f"recall@{max(KS)}"] == 1.0
    for k in KS:  # never more than the share of positives that fit in the top k
        per_query = [min(k, len(q.positives)) / len(q.positives) for q in task.queries]
        assert m[f"recall@{k}"] >= _aggregate(task, per_query) - 1e-9
    assert res["chance"] == pytest.approx(_aggregate(task, [len(q.positives) / _n_candidates(task, q)
                                                             for q in task.queries]))
    types = {q.type for q in task.queries} - {None}
    assert set(res.get("by_type", {})) == types
    assert all(v["top1"] == 1.0 for v in res.get("by_type", {}).values())


def _multi_positive(dataset: str, name: str) -> bool:
    return (dataset, name) in {("shapesworld", "i2t"), ("digits", "t2i"), ("digits", "i2t")}


@pytest.mark.parametrize(("dataset", "name"), ALL_TASKS, ids=[f"{d}/{t}" for d, t in ALL_TASKS])
def test_oracle_recall_is_share_of_positives_that_fit(tasks, dataset, name):
    task = tasks[dataset, name]
    assert _multi_positive(dataset, name) == any(len(q.positives) > 1 for q in task.queries)
    m = score_task(task, *_oracle(task), ks=KS)["metrics"]
    for k in KS:
        expected = _aggregate(task, [min(k, len(q.positives)) / len(q.positives) for q in task.queries])
        assert m[f"recall@{k}"] == pytest.approx(expected), k


@pytest.mark.parametrize(("dataset", "name"), ALL_TASKS, ids=[f"{d}/{t}" for d, t in ALL_TASKS])
def test_reversed_oracle_ranks_positives_last(tasks, dataset, name):
    task = tasks[dataset, name]
    res = score_task(task, *_oracle(task, sign=-1.0), ks=KS)
    m = res["metrics"]
    assert m["top1"] == 0.0 and m["hit@1"] == 0.0 and m["recall@1"] == 0.0
    # every negative (score 0) is ahead of the positives (score < 0)
    expected_mrr = _aggregate(task, [1 / (_n_candidates(task, q) - len(q.positives) + 1) for q in task.queries])
    assert m["mrr"] == pytest.approx(expected_mrr)


# ---------------------------------------------------------------------------------------------- 4. test-tiny


def test_tiny_report_shape(tiny_report, data_dirs, tasks):
    assert tiny_report["format"] == "retrieval.eval"
    assert tiny_report["k"] == [1, 5, 10]
    assert tiny_report["data"] == {ds: str(p.resolve()) for ds, p in data_dirs.items()}
    rows = tiny_report["results"]
    assert [(r["dataset"], r["task"]) for r in rows] == ALL_TASKS
    for r in rows:
        task = tasks[r["dataset"], r["task"]]
        meta = json.loads((task.root / "task.json").read_text())
        assert (r["model"], r["fusion"]) == ("test-tiny", "early")
        assert r["primary"] == task.primary == meta["primary"]
        assert r["queries"] == meta["queries"] == len(task.queries)
        assert r["candidates"] == meta["candidates"] == len(task.candidates)
        assert set(r["metrics"]) == {"top1", "mrr"} | {f"{m}@{k}" for m in ("hit", "recall") for k in (1, 5, 10)}
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    json.dumps(tiny_report)  # JSON-serialisable as it is


@pytest.mark.parametrize(("dataset", "name"), ALL_TASKS, ids=[f"{d}/{t}" for d, t in ALL_TASKS])
def test_tiny_is_no_better_than_chance(tiny_report, dataset, name):
    row = next(r for r in tiny_report["results"] if (r["dataset"], r["task"]) == (dataset, name))
    value, chance = row["metrics"][row["primary"]], row["chance"]
    assert 0 < chance < 1
    assert value <= chance + 0.15, (value, chance)
    if chance < 0.5:
        assert value <= 0.5, (value, chance)


# ---------------------------------------------------------------------------------------------- 5. fusion modes


class TwoModeEncoder(TinyTestEncoder):
    """Late fusion with two modes: 'a' embeds composed items as test-tiny does, 'b' ignores their text."""

    fusion = "late"
    fusion_modes = ("a", "b")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fusion_mode = "a"

    def prepare(self, image, text):
        if self.fusion_mode == "b" and image is not None and text:
            text = None
        return super().prepare(image, text)


FUSION_TASKS = "t2i,i2t,vqa,pos,tgit,zeroshot"


@pytest.fixture(scope="module")
def fusion_report(data_dirs) -> dict:
    """run_eval takes model names only, so load_encoder is patched to build the two-mode encoder."""
    import retrieval.encoders

    real = retrieval.encoders.load_encoder

    def load(name, device="auto"):
        return tiny(TwoModeEncoder) if name == "two-mode" else real(name, device=device)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(retrieval.encoders, "load_encoder", load)
        return run_eval(FUSION_TASKS, "two-mode,test-tiny", data=[data_dirs["shapesworld"], data_dirs["digits"]],
                        ks=(1, 5), device="cpu", progress=False)


def test_fusion_modes():
    assert fusion_modes(tiny(TwoModeEncoder)) == ("a", "b")
    assert fusion_modes(tiny()) == ("early",)

    class Late(TinyTestEncoder):
        fusion = "late"

    assert fusion_modes(tiny(Late)) == ("late",)


@pytest.mark.slow  # its report runs two models over six tasks: 10 s
def test_run_eval_rows_per_fusion_mode(fusion_report):
    rows = fusion_report["results"]
    # in the order of the names asked for; a bare name picks that task in every data set
    selected = [("shapesworld", "t2i"), ("digits", "t2i"), ("shapesworld", "i2t"), ("digits", "i2t"),
                ("shapesworld", "vqa"), ("shapesworld", "pos"), ("shapesworld", "tgit"), ("digits", "zeroshot")]
    labels = [("two-mode", "a"), ("two-mode", "b"), ("test-tiny", "early")]
    assert [(r["model"], r["fusion"], r["dataset"], r["task"]) for r in rows] == \
        [(*label, *task) for label in labels for task in selected]
    by = {(r["fusion"], r["dataset"], r["task"]): r for r in rows}
    for ds, name in selected:
        a, b, early = by["a", ds, name], by["b", ds, name], by["early", ds, name]
        assert a["metrics"] == early["metrics"]  # mode 'a' is test-tiny itself
        if name in COMPOSED:
            assert a["metrics"] != b["metrics"], name
        else:  # nothing composed in the task: the mode changes nothing
            assert a["metrics"] == b["metrics"], name
    summary = report.summary_lines(fusion_report)
    assert [line.split("  ")[0].strip() for line in summary[2:]] == \
        ["two-mode (a)", "two-mode (b)", "test-tiny", "(chance)"]


def test_evaluate_task_per_mode_with_own_cache(tasks):
    """The same check without run_eval: one cache per mode, as run_eval does."""
    encoder = tiny(TwoModeEncoder)
    task = tasks["shapesworld", "vqa"]
    rows = {}
    for mode in fusion_modes(encoder):
        encoder.fusion_mode = mode
        rows[mode] = evaluate_task(task, EmbeddingCache(encoder, progress=False), ks=(1, 5))
    assert rows["a"]["metrics"] != rows["b"]["metrics"]
    # 'b' ignores the question: every question about one image gets the same ranking
    encoder.fusion_mode = "b"
    q = EmbeddingCache(encoder, progress=False).embed([x.item for x in task.queries[:2]])
    assert task.queries[0].item.image == task.queries[1].item.image
    np.testing.assert_allclose(q[0], q[1], atol=1e-6)


# ---------------------------------------------------------------------------------------------- 6. select_tasks


def test_select_tasks(data_dirs):
    dirs = [data_dirs["shapesworld"], data_dirs["digits"]]
    shapes, digits = (data_dirs[d] / "tasks" for d in ("shapesworld", "digits"))
    assert select_tasks("all", dirs) == [shapes / t for t in SHAPES_TASKS] + [digits / t for t in DIGITS_TASKS]
    assert select_tasks("t2i", dirs) == [shapes / "t2i", digits / "t2i"]
    assert select_tasks("digits/t2i", dirs) == [digits / "t2i"]
    assert select_tasks("shapesworld/t2i", dirs) == [shapes / "t2i"]
    assert select_tasks(" vqa , zeroshot,tgit ", dirs) == [shapes / "vqa", digits / "zeroshot", shapes / "tgit"]
    assert select_tasks("t2i,digits/t2i", dirs) == [shapes / "t2i", digits / "t2i"]  # no duplicates
    assert select_tasks("t2i", [data_dirs["digits"]]) == [digits / "t2i"]


@pytest.mark.parametrize("names", ["nope", "t2i,nope", "digits/vqa", "shapesworld/zeroshot", "T2I"])
def test_select_unknown_task(data_dirs, names):
    with pytest.raises(RetrievalError) as err:
        select_tasks(names, [data_dirs["shapesworld"], data_dirs["digits"]])
    message = str(err.value)
    assert repr(names.split(",")[-1]) in message
    for known in ("all", "zeroshot", "digits/zeroshot", "shapesworld/tgit-pool", "pos"):
        assert known in message


def test_select_nothing_is_an_error(data_dirs):
    with pytest.raises(RetrievalError):
        select_tasks(",", [data_dirs["shapesworld"]])


def test_two_folders_of_one_data_set_are_refused(data_dirs, tmp_path):
    # the report names rows dataset/task: two ShapesWorld folders would overwrite each other's cells
    other = make_shapesworld(tmp_path / "other", n=30, size=32, train_pairs=False, progress=False).parent
    with pytest.raises(RetrievalError, match="both hold shapesworld"):
        select_tasks("all", [data_dirs["shapesworld"], other])


def test_select_from_a_folder_that_is_no_benchmark(tmp_path):
    with pytest.raises(RetrievalError, match="benchmark folder"):
        select_tasks("all", [tmp_path])


@pytest.mark.parametrize("ks", [(), (0,), (1, 0), (-5, 5)])
def test_run_eval_rejects_bad_k(data_dirs, ks):
    with pytest.raises(RetrievalError, match="positive"):
        run_eval("t2i", "test-tiny", data=[data_dirs["digits"]], ks=ks, device="cpu", progress=False)


# ---------------------------------------------------------------------------------------------- 7. CLI


@pytest.fixture(scope="module")
def cli_run(data_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "report.png"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETRIEVAL_CACHE", str(out / "cache"))
        proc = run_cli("eval", "tgit,vqa,zeroshot", "--model", "test-tiny", "--data", data_dirs["shapesworld"],
                       "--data", data_dirs["digits"], "--k", "1,5", "--device", "cpu", "--json", paths["json"],
                       "--markdown", paths["markdown"], "--plot", paths["plot"])
    return proc, paths, out


CLI_TASKS = ["shapesworld/tgit", "shapesworld/vqa", "digits/zeroshot"]


def test_cli_eval_table(cli_run):
    proc, paths, out = cli_run
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["model", *CLI_TASKS]
    assert set(lines[1].replace(" ", "")) == {"-"}
    result = json.loads(paths["json"].read_text())
    cells = lines[2].split()
    assert cells[0] == "test-tiny"
    assert cells[1:] == [f"{100 * r['metrics'][r['primary']]:.1f}" for r in result["results"]]
    assert lines[3].split()[0] == "(chance)"
    for path in paths.values():
        assert f"wrote {path}" in proc.stdout
    assert not (out / "cache").exists()  # --data given: no default data made


def test_cli_eval_json(cli_run, tasks):
    _, paths, _ = cli_run
    result = json.loads(paths["json"].read_text())
    assert result["format"] == "retrieval.eval"
    assert result["k"] == [1, 5]
    assert [f"{r['dataset']}/{r['task']}" for r in result["results"]] == CLI_TASKS
    for r in result["results"]:
        task = tasks[r["dataset"], r["task"]]
        assert (r["model"], r["fusion"], r["queries"], r["candidates"]) == \
            ("test-tiny", "early", len(task.queries), len(task.candidates))
        assert set(r["metrics"]) == {"top1", "mrr", "hit@1", "hit@5", "recall@1", "recall@5"}
    tgit = result["results"][0]
    assert set(tgit["by_type"]) == {"crop", "rotate", "jitter", "flip", "color"}


def test_cli_eval_markdown_and_plot(cli_run):
    _, paths, _ = cli_run
    result = json.loads(paths["json"].read_text())
    md = paths["markdown"].read_text()
    assert "| model | " + " | ".join(CLI_TASKS) + " |" in md
    row = "| test-tiny | " + " | ".join(f"{100 * r['metrics'][r['primary']]:.1f}" for r in result["results"]) + " |"
    assert row in md
    assert md == report.markdown(result)
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width > 100 and im.height > 100


def test_markdown_per_type_claim_holds(cli_run):
    _, paths, _ = cli_run
    result = json.loads(paths["json"].read_text())
    md = paths["markdown"].read_text()
    for r in result["results"]:
        if not r.get("by_type"):
            continue
        section = md.split(f"### {r['dataset']}/{r['task']}", 1)[1].split("###", 1)[0]
        if "is their mean" in section:
            mean = np.mean([v[r["primary"]] for v in r["by_type"].values()])
            assert r["metrics"][r["primary"]] == pytest.approx(mean), r["task"]


@pytest.mark.slow  # four CLI runs for argument errors: 8 s
@pytest.mark.parametrize(("args", "message"), [
    (["nope"], "no task 'nope'"),
    (["t2i", "--k", "a"], "--k must be comma-separated integers"),
    (["t2i", "--k", "0"], "k values must be positive"),
    (["t2i", "--k", "1,-1"], "k values must be positive"),
])
def test_cli_eval_errors(data_dirs, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    proc = run_cli("eval", args[0], "--model", "test-tiny", "--data", data_dirs["shapesworld"], *args[1:],
                   check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ---------------------------------------------------------------------------------------------- 8. EmbeddingCache


class CountingEncoder:
    """Wraps an encoder's encode to record every (image, text) it is asked for."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.calls: list[list[tuple[str | None, str | None]]] = []
        self._encode = encoder.encode
        encoder.encode = self.encode

    def encode(self, images=None, texts=None, batch_size=64):
        n = len(images) if images is not None else len(texts)
        self.calls.append(list(zip(images or [None] * n, texts or [None] * n)))
        return self._encode(images=images, texts=texts, batch_size=batch_size)

    @property
    def items(self) -> list[tuple[str | None, str | None]]:
        return [item for call in self.calls for item in call]


def test_embedding_cache_embeds_each_item_once(tasks):
    encoder = tiny()
    counter = CountingEncoder(encoder)
    vqa, t2i = tasks["shapesworld", "vqa"], tasks["shapesworld", "t2i"]
    # composed, text-only and image-only items mixed in one batch, plus copies under other ids
    items = [q.item for q in vqa.queries[:6]] + [q.item for q in t2i.queries[:5]] + t2i.candidates[:5]
    items += [Item(f"copy-{i}", it.image, it.text) for i, it in enumerate(items[::3])]
    items.append(Item("empty-text", t2i.candidates[0].image, ""))  # "" is no text
    cache = EmbeddingCache(encoder, batch_size=4, progress=False)
    vectors = cache.embed(items)
    keys = [(it.image, it.text or None) for it in items]
    assert vectors.shape == (len(items), encoder.dim) and vectors.dtype == np.float32
    assert sorted(counter.items, key=str) == sorted(set(keys), key=str)
    assert all(len(call) <= 4 for call in counter.calls)
    # the same vectors as encode gives for each item alone
    counter.calls.clear()
    for it, v in zip(items, vectors):
        alone = encoder.encode(images=[it.image] if it.image else None, texts=[it.text] if it.text else None)
        np.testing.assert_allclose(v, alone[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # a second call embeds only what is new, and returns the cached vectors for the rest
    counter.calls.clear()
    more = items[:3] + [q.item for q in vqa.queries[6:9]]
    again = cache.embed(more)
    assert counter.items == [(it.image, it.text) for it in vqa.queries[6:9] for it in [it.item]]
    np.testing.assert_array_equal(again[:3], vectors[:3])
    counter.calls.clear()
    assert cache.embed([]).shape == (0, encoder.dim)
    assert counter.calls == []


def test_evaluate_task_embeds_with_the_cache(tasks):
    encoder = tiny()
    counter = CountingEncoder(encoder)
    task = tasks["digits", "zeroshot"]
    cache = EmbeddingCache(encoder, progress=False)
    first = evaluate_task(task, cache, ks=(1,))
    n = len(counter.items)
    assert n == len({(it.image, it.text) for it in [*task.candidates, *(q.item for q in task.queries)]})
    second = evaluate_task(task, cache, ks=(1,))
    assert len(counter.items) == n  # nothing embedded twice
    assert second["metrics"] == first["metrics"]


def test_embedding_cache_shares_images_across_tasks(tasks):
    encoder = tiny()
    counter = CountingEncoder(encoder)
    cache = EmbeddingCache(encoder, progress=False)
    t2i, i2t = tasks["shapesworld", "t2i"], tasks["shapesworld", "i2t"]
    assert {os.path.realpath(c.image) for c in t2i.candidates} == {os.path.realpath(q.item.image)
                                                                  for q in i2t.queries}
    evaluate_task(t2i, cache, ks=(1,))
    counter.calls.clear()
    evaluate_task(i2t, cache, ks=(1,))
    assert [img for img, _ in counter.items if img is not None] == []  # its query images are t2i's candidates
