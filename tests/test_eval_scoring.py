"""Task files and task scoring of `retrieval eval` (score_task, evaluate_task) on small hand-made tasks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from test_eval import tiny

from evaluation.evaluate import EmbeddingCache, evaluate_task, score_task
from evaluation.tasks import Item, Query, Task, list_tasks, read_task, write_task
from retrieval.encoders.test_tiny import TinyTestEncoder
from retrieval.errors import RetrievalError


@pytest.fixture(scope="module")
def tiny_encoder() -> TinyTestEncoder:
    return tiny()


# ---------------------------------------------------------------------------------------------- 2. score_task


@pytest.fixture()
def images(tmp_path) -> dict[str, str]:
    out = {}
    for name, colour in (("a", "red"), ("b", "blue"), ("c", "green")):
        path = tmp_path / "imgs" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), colour).save(path)
        out[name] = str(path)
    return out


def _candidates_task(images: dict[str, str], by_type: bool = True) -> Task:
    """Per-query candidate lists; 'A#dup' is the same image as 'A' under another id (as in tgit's flip group).
    Type x has three queries, type y one, so the mean over types and the mean over queries differ."""
    cands = [Item("A", images["a"]), Item("A#dup", images["a"]), Item("B", images["b"]), Item("C", images["c"]),
             Item("D", text="a dog")]
    queries = [
        Query(Item("q1", images["a"], "make it blue"), ("B",), ("A", "A#dup", "B"), "x"),
        Query(Item("q2", images["a"], "keep it"), ("A",), ("A", "A#dup", "B"), "x"),
        Query(Item("q3", images["b"], "make it green"), ("C",), ("A", "B", "C"), "x"),
        Query(Item("q4", text="the green one"), ("C",), ("A", "B", "C", "D"), "y"),
    ]
    return Task("hand", "handmade", "candidates", "top1", "a hand-made candidates task", queries, cands,
                by_type=by_type, extra={"note": "kept"})


# candidate vectors: A and A#dup are the same image, so they embed the same
CAND_VECTORS = np.eye(5, dtype=np.float32)[[0, 0, 1, 2, 3]]
QUERY_VECTORS = np.eye(5, dtype=np.float32)[[1, 0, 2, 3]]


def test_task_round_trip(tmp_path, images):
    task = _candidates_task(images)
    folder = write_task(task, tmp_path / "tasks" / "hand")
    assert list_tasks(tmp_path) == ["hand"]
    back = read_task(folder)
    assert (back.name, back.dataset, back.kind, back.primary, back.by_type) == ("hand", "handmade", "candidates",
                                                                               "top1", True)
    assert back.extra == {"note": "kept"}
    assert [c.id for c in back.candidates] == [c.id for c in task.candidates]
    assert [c.text for c in back.candidates] == [c.text for c in task.candidates]
    assert [(q.item.id, q.item.text, q.positives, q.candidates, q.type) for q in back.queries] == \
        [(q.item.id, q.item.text, q.positives, q.candidates, q.type) for q in task.queries]
    for old, new in zip([*task.candidates, *(q.item for q in task.queries)],
                        [*back.candidates, *(q.item for q in back.queries)]):
        if old.image is None:
            assert new.image is None
        else:
            assert os.path.isabs(new.image) and os.path.samefile(new.image, old.image)
    # paths in the files are relative, so the folder can move
    record = json.loads((folder / "candidates.jsonl").read_text().splitlines()[0])
    assert not os.path.isabs(record["image"])
    with pytest.raises(RetrievalError):
        write_task(Task("bad", "handmade", "ranked", "top1", "", [], []), tmp_path / "bad")


def test_read_task_rejects_unknown_positives(tmp_path, images):
    task = _candidates_task(images)
    task.queries.append(Query(Item("q5", text="?"), ("Z",), ("A", "B"), "y"))
    folder = write_task(task, tmp_path / "bad")
    with pytest.raises(RetrievalError, match="q5"):
        read_task(folder)


def test_score_candidates_task_by_type(tmp_path, images):
    task = read_task(write_task(_candidates_task(images), tmp_path / "hand"))
    res = score_task(task, QUERY_VECTORS, CAND_VECTORS, ks=(1, 2))
    # q1: B wins (rank 0). q2: A ties with its duplicate A#dup → first half the time. q3: C wins.
    # q4: D wins, C ties A and B → rank 1, 2 or 3, each a third of the time
    x = {"top1": 2.5 / 3, "mrr": (1 + 0.75 + 1) / 3, "hit@1": 2.5 / 3, "recall@1": 2.5 / 3, "hit@2": 1.0,
         "recall@2": 1.0}
    y = {"top1": 0.0, "mrr": (1 / 2 + 1 / 3 + 1 / 4) / 3, "hit@1": 0.0, "recall@1": 0.0, "hit@2": 1 / 3,
         "recall@2": 1 / 3}
    assert res["by_type"] == {"x": pytest.approx(x), "y": pytest.approx(y)}
    # primary metrics: each type counts the same (not each query)
    assert res["metrics"] == pytest.approx({k: (x[k] + y[k]) / 2 for k in x})
    assert res["metrics"]["top1"] == pytest.approx(2.5 / 6)  # over queries it would be 0.625
    assert res["chance"] == pytest.approx((1 / 3 + 1 / 4) / 2)  # over queries: 5/16

    flat = score_task(read_task(write_task(_candidates_task(images, by_type=False), tmp_path / "flat")),
                      QUERY_VECTORS, CAND_VECTORS, ks=(1, 2))
    assert flat["metrics"]["top1"] == pytest.approx(0.625)
    assert flat["metrics"]["mrr"] == pytest.approx((1 + 0.75 + 1 + (1 / 2 + 1 / 3 + 1 / 4) / 3) / 4)
    assert flat["chance"] == pytest.approx(5 / 16)
    assert flat["by_type"] == res["by_type"]  # per-type scores are reported either way


def test_score_pool_task_by_type(tmp_path):
    cands = [Item(f"P{i}", text=f"text {i}") for i in range(1, 5)]
    queries = [Query(Item("q1", text="one"), ("P1",), None, "u"),
               Query(Item("q2", text="one or two"), ("P1", "P2"), None, "u"),
               Query(Item("q3", text="four"), ("P4",), None, "v")]
    task = read_task(write_task(Task("pool", "handmade", "pool", "top1", "", queries, cands, by_type=True),
                                tmp_path / "pool"))
    q = np.array([[1, 0, 0, 0], [0.1, 0.2, 0.9, 0], [0.3, 0.2, 0.1, 0.0]], np.float32)
    res = score_task(task, q, np.eye(4, dtype=np.float32), ks=(1, 2, 3))
    u = {"top1": 0.5, "mrr": 0.75, "hit@1": 0.5, "recall@1": 0.5, "hit@2": 1.0, "recall@2": 0.75,
         "hit@3": 1.0, "recall@3": 1.0}
    v = {"top1": 0.0, "mrr": 0.25, "hit@1": 0.0, "recall@1": 0.0, "hit@2": 0.0, "recall@2": 0.0,
         "hit@3": 0.0, "recall@3": 0.0}
    assert res["by_type"] == {"u": pytest.approx(u), "v": pytest.approx(v)}
    assert res["metrics"] == pytest.approx({k: (u[k] + v[k]) / 2 for k in u})
    assert res["metrics"]["top1"] == pytest.approx(0.25)  # over queries: 1/3
    assert res["chance"] == pytest.approx(((1 / 4 + 2 / 4) / 2 + 1 / 4) / 2)  # over queries: 1/3

    # without types, by_type has nothing to average over: the mean over queries, and no by_type entry
    plain = Task("plain", "handmade", "pool", "top1", "", [Query(x.item, x.positives) for x in task.queries],
                 task.candidates, by_type=True)
    res = score_task(plain, q, np.eye(4, dtype=np.float32), ks=(1,))
    assert "by_type" not in res
    assert res["metrics"]["top1"] == pytest.approx(1 / 3) and res["chance"] == pytest.approx(1 / 3)


def test_evaluate_task_duplicated_image_ties_with_the_positive(tmp_path, images, tiny_encoder):
    """With a real encoder the duplicated image embeds exactly like the positive: first half the time."""
    cands = [Item("A", images["a"]), Item("A#dup", images["a"]), Item("B", images["b"])]
    queries = [Query(Item("same", images["a"]), ("A",), ("A", "A#dup", "B"), "one"),
               Query(Item("both", images["a"]), ("A", "A#dup"), ("A", "A#dup", "B"), "both")]
    task = read_task(write_task(Task("dup", "handmade", "candidates", "top1", "", queries, cands, by_type=True),
                                tmp_path / "dup"))
    row = evaluate_task(task, EmbeddingCache(tiny_encoder, progress=False), ks=(1, 2))
    assert row["by_type"]["one"]["top1"] == 0.5 and row["by_type"]["one"]["mrr"] == 0.75
    assert row["by_type"]["both"]["top1"] == 1.0
    assert row["metrics"]["top1"] == 0.75
    assert row["chance"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert {k: row[k] for k in ("dataset", "task", "primary", "queries", "candidates")} == \
        {"dataset": "handmade", "task": "dup", "primary": "top1", "queries": 2, "candidates": 3}
    assert row["seconds"] >= 0


def test_the_primary_metric_is_measured_whatever_the_cut_offs():
    """`--k 5,10` on a task whose primary metric is hit@1 still reports hit@1 and its chance level."""
    cands = [Item(f"P{i}", text=f"text {i}") for i in range(4)]
    task = Task("pool", "handmade", "pool", "hit@1", "", [Query(Item("q", text="one"), ("P1",))], cands)
    res = score_task(task, np.array([[0.1, 0.9, 0.3, 0.0]], np.float32), np.eye(4, dtype=np.float32), ks=(5, 10))
    assert res["metrics"]["hit@1"] == 1.0 and res["metrics"]["hit@5"] == 1.0
    assert res["chance"] == pytest.approx(1 / 4)
