"""`retrieval eval BENCH --data DIR` on fixtures in each benchmark's published layout: an oracle scores 100 %, a
constant model scores chance, hand-made rankings give hand-computed metrics, a malformed folder one error line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from benchmark_layouts import (
    MMEB_INSTRUCTION,
    image,
    write_cirr,
    write_fashioniq,
    write_imagefolder,
    write_json,
    write_karpathy,
    write_mmeb,
    write_probe_plugin,
)
from conftest import RETRIEVAL

from evaluation.benchmark_eval import score_benchmark
from evaluation.benchmarks import read_benchmark
from evaluation.benchmarks.fashioniq import join_captions
from evaluation.benchmarks.mmeb import CATEGORIES, SUBSETS
from retrieval.errors import RetrievalError

MODELS = "probe-oracle,probe-constant"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("probe")
    return write_probe_plugin(root) | {"RETRIEVAL_CACHE": str(root / "cache")}


def evaluate(env, bench: str, data: Path, *args: str, models: str = MODELS) -> dict[tuple[str, str], dict]:
    """Run the CLI; the report's rows by (model, task)."""
    out = data.parent / f"{data.name}-report.json"
    proc = subprocess.run([str(RETRIEVAL), "eval", bench, "--data", str(data), "--model", models, "--json",
                           str(out), *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {(r["model"], r["task"]): r for r in json.loads(out.read_text())["results"]}


def refused(env, bench: str, data: Path, *args: str) -> str:
    """The CLI's one error line for a folder it must refuse."""
    proc = subprocess.run([str(RETRIEVAL), "eval", bench, "--data", str(data), "--model", "probe-oracle", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def refusal(bench: str, data: Path, subsets: list[str] | None = None, **options) -> str:
    """The reader's one-line refusal of a folder (what the CLI prints after "error: ")."""
    with pytest.raises(RetrievalError) as e:
        read_benchmark(bench, data, subsets, **options)
    assert "\n" not in str(e.value)
    return str(e.value)


def check_oracle_and_constant(rows: dict, tasks: list[str]) -> None:
    for task in tasks:
        oracle, constant = rows[("probe-oracle", task)], rows[("probe-constant", task)]
        assert oracle["metrics"][oracle["primary"]] == 1.0, task
        assert constant["metrics"][constant["primary"]] == pytest.approx(constant["chance"]), task
        assert constant["chance"] < 1.0, task


def one_hot(dim: int, dims: dict[str, int]) -> np.ndarray:
    """The unit vector of a candidate: dimension `dim` of len(dims) + 1."""
    return np.eye(len(dims) + 1, dtype=np.float32)[dim]


def unit_vectors(scores: dict[str, float], dims: dict[str, int]) -> np.ndarray:
    """A query vector whose inner product with the one-hot vector of candidate c is scores[c] (scaled by one
    positive factor, which keeps the order)."""
    v = np.zeros(len(dims) + 1, np.float32)
    for c, s in scores.items():
        v[dims[c]] = s
    v[-1] = 1.0  # keeps the vector unit-normable whatever the scores
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------------------------------------- MMEB


def test_mmeb_oracle_constant_and_categories(tmp_path, env):
    """All 36 subsets: every score and category; the constant model's category scores are the unweighted mean of
    its subsets' chance levels, whatever their sizes."""
    subsets = {}
    for n, subset in enumerate(SUBSETS):
        width = 2 + n % 4  # candidate lists of 2 to 5
        subsets[subset] = [{"query": 10 + n, "targets": [10 + n, *range(100, 100 + width - 1)]},
                           {"query": 150 + n, "targets": [150 + n, 11 + n]}]
    data = write_mmeb(tmp_path / "mmeb", subsets)
    rows = evaluate(env, "mmeb", data)
    check_oracle_and_constant(rows, [*SUBSETS, *CATEGORIES, "Overall"])
    for category, members in CATEGORIES.items():
        expected = np.mean([(1 / (2 + SUBSETS.index(s) % 4) + 1 / 2) / 2 for s in members])
        assert rows[("probe-constant", category)]["metrics"]["top1"] == pytest.approx(expected)
    assert not any(r.get("published") for r in rows.values())  # FuseLIP's figures are for its own protocol
    fuselip = evaluate(env, "mmeb", data, "--protocol", "fuselip", models="probe-oracle")
    published = {task for (model, task), r in fuselip.items() if r.get("published")}
    assert published == set(CATEGORIES)
    assert fuselip[("FuseLIP-B, CC3M+MM [published]", "VQA")]["metrics"]["top1"] == pytest.approx(0.175)


def test_mmeb_protocols_change_the_texts_as_fuselip_does(tmp_path):
    hateful = ("<|image_1|>\nRepresent the given image for binary classification to determine whether it "
               "constitutes hateful speech or not\n")
    subsets = {
        "ImageNet-1K": [{"query": 1, "targets": [1, 2], "label": "crane, bird"}],
        "HatefulMemes": [{"query": 3, "qry_text": hateful, "targets": [3, 4], "label": "Yes"}],
        "Country211": [{"query": 5, "targets": [5, 6], "label": "Fiji"}],
        "OK-VQA": [{"query": 7, "qry_text": MMEB_INSTRUCTION + "What is this?\n", "targets": [7, 8]}],
        "EDIS": [{"query": 9, "qry_text": "Find a news image that matches the provided caption: a storm\n",
                  "targets": [9, 10], "text_targets": False}],
    }
    data = write_mmeb(tmp_path / "mmeb", subsets)

    def texts(protocol: str) -> dict[str, tuple[str | None, list[str | None]]]:
        bench = read_benchmark("mmeb", data, list(subsets), protocol=protocol)
        return {t.name: (t.queries[0].item.text, [c.text for c in t.candidates if c.id in t.queries[0].candidates])
                for t in bench.tasks}

    mmeb, fuselip = texts("mmeb"), texts("fuselip")
    assert mmeb["ImageNet-1K"] == ("<|image_1|>\nRepresent the given image for classification\n",
                                   ["#1 crane, bird", "#2 crane, bird"])
    assert mmeb["OK-VQA"][0] == MMEB_INSTRUCTION + "What is this?\n"
    assert fuselip["ImageNet-1K"] == (None, ["a photo of a #1 crane", "a photo of a #2 crane"])
    assert fuselip["HatefulMemes"] == ("Is this image hateful?", ["#3 Yes", "#4 Yes"])  # no prefix for its labels
    assert fuselip["Country211"][1] == ["this is in the country of #5 Fiji", "this is in the country of #6 Fiji"]
    assert fuselip["OK-VQA"][0] == "What is this?"
    # an instruction FuseLIP's table does not hold stays
    assert fuselip["EDIS"] == ("Find a news image that matches the provided caption: a storm", [None, None])


def test_mmeb_identical_candidates_share_the_positive(tmp_path, env):
    """After FuseLIP's comma cut two ImageNet names are one text: as in MMEB's argmax, the twin of the positive
    counts as the positive; under MMEB's own texts they differ and a model that cannot tell them apart gets half."""
    rows = [{"query": 5, "targets": [5, 5, 6], "label": "crane"}]
    data = write_mmeb(tmp_path / "mmeb", {"ImageNet-1K": rows})
    table = pq.read_table(data / "ImageNet-1K" / "test-00000-of-00001.parquet").to_pylist()
    table[0]["tgt_text"] = ["#5 crane, bird", "#5 crane, machine", "#6 crane"]
    pq.write_table(pa.Table.from_pylist(table), data / "ImageNet-1K" / "test-00000-of-00001.parquet")
    own = evaluate(env, "mmeb", data, "--subsets", "ImageNet-1K")
    assert own[("probe-oracle", "ImageNet-1K")]["metrics"]["top1"] == pytest.approx(0.5)
    assert own[("probe-constant", "ImageNet-1K")]["metrics"]["top1"] == pytest.approx(1 / 3)
    cut = evaluate(env, "mmeb", data, "--subsets", "ImageNet-1K", "--protocol", "fuselip")
    assert cut[("probe-oracle", "ImageNet-1K")]["metrics"]["top1"] == 1.0
    assert cut[("probe-constant", "ImageNet-1K")]["metrics"]["top1"] == pytest.approx(2 / 3)


def test_mmeb_malformed_folders(tmp_path, env):
    data = write_mmeb(tmp_path / "mmeb", {"OK-VQA": [{"query": 1, "targets": [1, 2]}]})
    assert "ImageNet-1K/test-00000-of-00001.parquet is missing" in refused(env, "mmeb", data)  # the first of 36
    assert "has no subset 'OKVQA'" in refusal("mmeb", data, ["OKVQA"])
    assert "--protocol clip does not apply" in refusal("mmeb", data, ["OK-VQA"], protocol="clip")
    path = data / "OK-VQA" / "test-00000-of-00001.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["tgt_img_path"]), path)
    assert "OK-VQA/test-00000-of-00001.parquet has no column 'tgt_img_path'" in refusal("mmeb", data, ["OK-VQA"])
    pq.write_table(table.set_column(1, "qry_img_path", pa.array(["../../../etc/passwd"])), path)
    assert "names an image outside the folder" in refusal("mmeb", data, ["OK-VQA"])
    pq.write_table(table.set_column(2, "tgt_text", pa.array([["#1 one"]])), path)
    assert "must be lists of strings of one length" in refusal("mmeb", data, ["OK-VQA"])
    pq.write_table(table.set_column(2, "tgt_text", pa.array([["#1 one", " "]])), path)
    assert "OK-VQA row 0: an item with neither text nor image" in refusal("mmeb", data, ["OK-VQA"])
    pq.write_table(table, path)
    (data / "eval_images" / "OK-VQA" / "q0.jpg").unlink()
    assert "1 of 1 images are missing, the first eval_images/OK-VQA/q0.jpg" in refusal("mmeb", data, ["OK-VQA"])
    path.write_bytes(b"not parquet")
    assert "OK-VQA/test-00000-of-00001.parquet is not Parquet" in refusal("mmeb", data, ["OK-VQA"])


def cirr_fixture(root: Path) -> Path:
    gallery = {f"dev-{i}-0-img{i % 2}": 20 + i for i in range(8)}
    n = list(gallery)
    pairs = [{"reference": n[0], "target_hard": n[3], "caption": "#23 with a dog", "members": n[:6]},
             {"reference": n[1], "target_hard": n[7], "caption": "#27 at night", "members": [n[1], n[7], *n[2:6]]}]
    return write_cirr(root, pairs, gallery)


def test_cirr_oracle_and_constant(tmp_path, env):
    rows = evaluate(env, "cirr", cirr_fixture(tmp_path / "cirr"))
    check_oracle_and_constant(rows, ["val", "val-subset"])
    # the reference is left out: one target among the 7 other images; five in the subset
    assert rows[("probe-constant", "val")]["metrics"]["hit@5"] == pytest.approx(5 / 7)
    assert rows[("probe-constant", "val-subset")]["metrics"]["hit@2"] == pytest.approx(2 / 5)
    assert {k for k in rows[("probe-oracle", "val")]["metrics"] if k.startswith("hit@")} == \
        {"hit@1", "hit@5", "hit@10", "hit@50"}
    assert {k for k in rows[("probe-oracle", "val-subset")]["metrics"] if k.startswith("hit@")} == \
        {"hit@1", "hit@2", "hit@3"}


def test_cirr_recall_and_subset_recall_by_hand(tmp_path):
    """Pair 0: its reference scores highest (left out), two non-members come next, then the target: Recall@1 0,
    Recall@5 1, but first in its image set. Pair 1: three members above the target: 0-based subset rank 3."""
    bench = read_benchmark("cirr", cirr_fixture(tmp_path / "cirr"))
    names = [c.id for c in bench.tasks[0].candidates]
    dims = {name: i for i, name in enumerate(names)}
    vectors = {(c.image, None): one_hot(dims[c.id], dims) for c in bench.tasks[0].candidates}
    n = names
    ranking = {0: {n[0]: 0.9, n[6]: 0.8, n[7]: 0.7, n[3]: 0.6, n[1]: 0.1},
               1: {n[2]: 0.9, n[3]: 0.8, n[4]: 0.7, n[7]: 0.6, n[0]: 0.5}}
    for i, q in enumerate(bench.tasks[0].queries):
        vectors[(q.item.image, q.item.text)] = unit_vectors(ranking[i], dims)
    rows = {r["task"]: r["metrics"] for r in score_benchmark(bench, vectors)}
    # pair 0: global rank 2 (0-based) → hits at 5; pair 1: global rank 3 → hits at 5
    assert (rows["val"]["hit@1"], rows["val"]["hit@5"], rows["val"]["hit@50"]) == (0.0, 1.0, 1.0)
    assert rows["val"]["mrr"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    # subsets: pair 0 first (n1, n2, n4, n5 score lower or nothing); pair 1 behind n2, n3, n4 → rank 3
    assert rows["val-subset"]["hit@1"] == 0.5 and rows["val-subset"]["hit@3"] == 0.5
    assert rows["val-subset"]["mrr"] == pytest.approx((1 + 1 / 4) / 2)


def test_cirr_reads_the_clip4cir_layout_too(tmp_path):
    """CLIP4Cir keeps the annotations in cirr/ beside the image folders."""
    data = cirr_fixture(tmp_path / "cirr")
    (data / "cirr").mkdir()
    for folder in ("captions", "image_splits"):
        os.rename(data / folder, data / "cirr" / folder)
    bench = read_benchmark("cirr", data)
    assert [len(t.queries) for t in bench.tasks] == [2, 2] and len(bench.tasks[0].candidates) == 8


def test_cirr_malformed_folders(tmp_path, env):
    data = cirr_fixture(tmp_path / "cirr")
    captions = json.loads((data / "captions" / "cap.rc2.val.json").read_text())
    del captions[1]["target_hard"]
    write_json(data / "captions" / "cap.rc2.val.json", captions)
    assert "captions/cap.rc2.val.json entry 1 has no 'target_hard'" in refused(env, "cirr", data)
    captions[1]["target_hard"] = captions[1]["reference"]
    write_json(data / "captions" / "cap.rc2.val.json", captions)
    assert "the target must differ from the reference" in refusal("cirr", data)
    (data / "image_splits" / "split.rc2.val.json").unlink()
    assert "image_splits/split.rc2.val.json is missing" in refusal("cirr", data)
    with pytest.raises(RetrievalError, match="cirr has no subsets"):
        read_benchmark("cirr", data, ["val"])


# ---------------------------------------------------------------------------------------------- FashionIQ


def test_fashioniq_caption_join():
    assert join_captions(" is shiny and silver with shorter sleeves.", "fit and flare") == \
        "Is shiny and silver with shorter sleeves and fit and flare"
    assert join_captions("Has A Logo?", " yello and more flowing. ") == "Has a logo and yello and more flowing"
    assert join_captions("is red, ", ",longer,") == "Is red and longer"


def fashioniq_fixture(root: Path, size: int = 60) -> Path:
    categories = {}
    for c, category in enumerate(("dress", "shirt", "toptee")):
        gallery = {f"B00{c}{i:05d}": (60 * c + i) % 256 for i in range(size)}
        names = list(gallery)
        queries = [{"candidate": names[0], "target": names[i], "captions": [f" is shiny.#{gallery[names[i]]}",
                                                                           "fit and flare?"]}
                   for i in (1, 2)]
        categories[category] = (gallery, queries)
    return write_fashioniq(root, categories)


def test_fashioniq_oracle_constant_and_average(tmp_path, env):
    rows = evaluate(env, "fashioniq", fashioniq_fixture(tmp_path / "fiq"))
    check_oracle_and_constant(rows, ["dress", "shirt", "toptee", "average"])
    # one target among the 60 gallery images (the reference stays in)
    assert rows[("probe-constant", "dress")]["metrics"]["hit@10"] == pytest.approx(10 / 60)
    assert rows[("probe-constant", "average")]["metrics"]["hit@50"] == pytest.approx(50 / 60)
    one = evaluate(env, "fashioniq", tmp_path / "fiq", "--subsets", "shirt")
    assert {task for _, task in one} == {"shirt"}  # no average of one category


def test_fashioniq_recall_at_10_and_50_by_hand(tmp_path):
    bench = read_benchmark("fashioniq", fashioniq_fixture(tmp_path / "fiq"), ["dress"])
    task = bench.tasks[0]
    assert task.queries[0].item.text.startswith("Is shiny.#") and task.queries[0].item.text.endswith(
        " and fit and flare")
    names = [c.id for c in task.candidates]
    dims = {name: i for i, name in enumerate(names)}
    vectors = {(c.image, None): one_hot(dims[c.id], dims) for c in task.candidates}
    # query 0: its target (names[1]) behind 12 others → rank 12; query 1: target names[2] behind 55 → rank 55
    above = {0: names[3:15], 1: names[3:58]}
    for i, q in enumerate(task.queries):
        target = q.positives[0]
        vectors[(q.item.image, q.item.text)] = unit_vectors({**{a: 0.9 for a in above[i]}, target: 0.5}, dims)
    rows = {r["task"]: r["metrics"] for r in score_benchmark(bench, vectors)}
    assert (rows["dress"]["hit@10"], rows["dress"]["hit@50"]) == (0.0, 0.5)


def test_fashioniq_malformed_folders(tmp_path, env):
    data = fashioniq_fixture(tmp_path / "fiq", size=4)
    (data / "captions" / "cap.toptee.val.json").write_text('[{"candidate": "B002', encoding="utf-8")
    assert "captions/cap.toptee.val.json is not JSON" in refused(env, "fashioniq", data)
    (data / "captions" / "cap.toptee.val.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "captions/cap.toptee.val.json is not JSON" in refusal("fashioniq", data)
    write_json(data / "captions" / "cap.toptee.val.json", [{"candidate": "B00200000", "target": "B00200001",
                                                            "captions": ["only one"]}])
    assert "has 1 captions, not two" in refusal("fashioniq", data)
    os.rename(data / "images", data / "pictures")
    assert "images/ (or resized_images/dress/) is missing" in refusal("fashioniq", data)


# ---------------------------------------------------------------------------------------------- COCO / Flickr30k


@pytest.mark.parametrize("name", ["coco", "flickr30k"])
def test_karpathy_oracle_constant_and_published(tmp_path, env, name):
    rows = evaluate(env, name, write_karpathy(tmp_path / name, name, list(range(40, 52))))
    check_oracle_and_constant(rows, ["t2i", "i2t"])
    # twelve test images (the train image is left out), five captions each
    assert rows[("probe-oracle", "t2i")]["queries"] == 60 and rows[("probe-oracle", "t2i")]["candidates"] == 12
    assert rows[("probe-constant", "i2t")]["metrics"]["hit@5"] == pytest.approx(1 - np.prod(
        [(55 - i) / (60 - i) for i in range(5)]))  # any of 5 positives among 60 tied captions in the top 5
    assert rows[("probe-oracle", "rsum")]["metrics"]["rsum"] == pytest.approx(6.0)
    published = {model for (model, _), r in rows.items() if r.get("published")}
    # Flickr30k's test split is the 1k one; a COCO file of 12 test images is not the 5k test
    assert published == ({"SPARC ViT-B/16 [published]", "CLIP ViT-B/16 (SPARC's) [published]"}
                         if name == "flickr30k" else set())


@pytest.mark.slow
def test_coco_1k_is_the_mean_of_five_folds(tmp_path):
    """5,000 test images whose vectors repeat every 1,000: within a fold each caption has one image, over the 5k
    every caption ties with five images and every image with 25 captions."""
    data = write_karpathy(tmp_path / "coco", "coco", [n % 256 for n in range(5000)], extra_splits=False,
                          captions_of=lambda n, code: [f"image {n}, caption {j}" for j in range(5)])
    bench = read_benchmark("coco", data)
    assert [t.name for t in bench.tasks][:2] == ["t2i-5k", "i2t-5k"] and len(bench.tasks) == 12
    assert {len(t.candidates) for t in bench.tasks if "fold" in t.name and t.name.startswith("t2i")} == {1000}
    images = bench.tasks[0].candidates
    # 1,000 sign vectors of unit length, each closest to itself; entries ±1/8 keep every product exact, so equal
    # vectors tie exactly however the matrix product sums
    basis = np.random.default_rng(0).choice([-0.125, 0.125], size=(1000, 64)).astype(np.float32)
    vectors = {(img.image, None): basis[n % 1000] for n, img in enumerate(images)}
    for q in bench.tasks[0].queries:
        vectors[(q.item.image, q.item.text)] = vectors[(images[int(q.positives[0].split("-")[1])].image, None)]
    rows = {r["task"]: r for r in score_benchmark(bench, vectors)}
    assert not any("fold" in t for t in rows)
    assert rows["t2i-1k"]["metrics"]["hit@1"] == 1.0 and rows["i2t-1k"]["metrics"]["hit@1"] == 1.0
    assert rows["t2i-5k"]["metrics"]["hit@1"] == pytest.approx(1 / 5)
    assert rows["t2i-5k"]["metrics"]["hit@5"] == 1.0
    assert rows["i2t-5k"]["metrics"]["hit@1"] == pytest.approx(1 / 5)  # 5 of the 25 tied captions are its own
    assert rows["rsum-1k"]["metrics"]["rsum"] == pytest.approx(6.0)


def test_karpathy_malformed_folders(tmp_path, env):
    data = write_karpathy(tmp_path / "coco", "coco", [1, 2, 3])
    spec = json.loads((data / "dataset_coco.json").read_text())
    spec["images"][1]["sentences"] = spec["images"][1]["sentences"][:3]
    write_json(data / "dataset_coco.json", spec)
    assert "dataset_coco.json image 1 has fewer than 5 sentences" in refused(env, "coco", data)
    spec["images"][1]["sentences"] = [{"raw": " "}] * 5
    write_json(data / "dataset_coco.json", spec)
    assert "dataset_coco.json image 1 has an empty caption" in refusal("coco", data)
    del spec["images"][1]["filepath"]
    write_json(data / "dataset_coco.json", spec)
    assert "dataset_coco.json image 1 has no 'filepath'" in refusal("coco", data)
    assert "dataset_flickr30k.json is missing" in refusal("flickr30k", data)


# ---------------------------------------------------------------------------------------------- image folders


def test_imagefolder_oracle_constant_and_names(tmp_path, env):
    data = write_imagefolder(tmp_path / "folder", {"cat": 3, "dog": 4, "emu": 5, "fox": 6, "gnu": 7, "hen": 8})
    rows = evaluate(env, "imagefolder", data)
    check_oracle_and_constant(rows, ["zeroshot"])
    assert rows[("probe-constant", "zeroshot")]["metrics"]["hit@5"] == pytest.approx(5 / 6)
    bench = read_benchmark("imagefolder", data)
    assert [c.text for c in bench.tasks[0].candidates] == ["#3 cat", "#4 dog", "#5 emu", "#6 fox", "#7 gnu", "#8 hen"]
    assert len(bench.ensembles["cat"]) == 80 and bench.ensembles["cat"][0].text == "a bad photo of a #3 cat."


def test_imagefolder_classes_average_their_templates(tmp_path):
    """Class a's prompts embed as e0 and e1, class b's as e0 and e2: an image at e1 is class a only through the
    mean over templates (the first template alone ties them)."""
    data = write_imagefolder(tmp_path / "folder", {"a": 1, "b": 2}, per_class=1)
    (data / "templates.txt").write_text("first {}\nsecond {}\n")
    bench = read_benchmark("imagefolder", data)
    e = np.eye(3, dtype=np.float32)
    vectors = {("first #1 a"): e[0], ("second #1 a"): e[1], ("first #2 b"): e[0], ("second #2 b"): e[2]}
    vectors = {(None, text): v for text, v in vectors.items()}
    for q in bench.tasks[0].queries:
        vectors[(q.item.image, None)] = e[1]
    rows = score_benchmark(bench, vectors)
    assert rows[0]["metrics"]["top1"] == 0.5  # the image of a is right, the image of b (also at e1) is not


def test_imagenet_folder_is_named_and_compared(tmp_path, env):
    classes = {f"n{1440764 + i:08d}": i % 256 for i in range(1000)}
    data = write_imagefolder(tmp_path / "val", classes, per_class=1)
    (data / "templates.txt").write_text("a photo of a {}.\n")
    rows = evaluate(env, "imagefolder", data, models="probe-constant")
    assert rows[("probe-constant", "zeroshot")]["dataset"] == "imagenet"
    assert rows[("probe-constant", "zeroshot")]["metrics"]["top1"] == pytest.approx(1 / 1000)
    published = {model: r["metrics"]["hit@1"] for (model, _), r in rows.items() if r.get("published")}
    assert published["FuseLIP-B, CC3M+MM [published]"] == pytest.approx(0.181)
    assert published["CLIP+FDT ViT-B/32, CC3M [published]"] == pytest.approx(0.184)
    (data / "classnames.txt").unlink()  # open_clip's ImageNet names, in WordNet-id order
    names = [c.text for c in read_benchmark("imagefolder", data).tasks[0].candidates]
    assert names[:3] == ["tench", "goldfish", "great white shark"] and len(names) == 1000


def test_imagefolder_malformed_folders(tmp_path, env):
    data = write_imagefolder(tmp_path / "folder", {"cat": 3, "dog": 4})
    (data / "classnames.txt").write_text("cat\n")
    assert "classnames.txt has 1 names for 2 class folders" in refused(env, "imagefolder", data)
    (data / "classnames.txt").unlink()
    (data / "templates.txt").write_text("a photo\n")
    assert "templates.txt needs {}" in refusal("imagefolder", data)
    assert "1 class subfolders" in refusal("imagefolder", write_imagefolder(tmp_path / "one", {"cat": 3}))
    (data / "templates.txt").unlink()
    (data / "emu").mkdir()
    assert "class folder emu/ holds no images" in refusal("imagefolder", data)
    (data / "emu").rmdir()
    os.mkdir(os.fsencode(data) + b"/caf\xe9")
    assert "has a name that is not UTF-8 text" in refusal("imagefolder", data)


# ---------------------------------------------------------------------------------------------- the cache and the CLI


def test_benchmark_images_are_encoded_once_per_model(tmp_path, env):
    data = cirr_fixture(tmp_path / "cirr")
    cache = Path(env["RETRIEVAL_CACHE"]) / "benchmarks" / "cirr"
    before = set(cache.iterdir()) if cache.is_dir() else set()

    def run(model: str) -> str:
        proc = subprocess.run([str(RETRIEVAL), "eval", "cirr", "--data", str(data), "--model", model],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert "encode probe-oracle" in run("probe-oracle")
    assert "encode probe-oracle" not in run("probe-oracle")  # read back from the cache
    assert len(set(cache.iterdir()) - before) == 1
    assert "encode probe-constant" in run("probe-constant")
    image(data / "dev" / "dev-3-0-img1.png", 99)  # a changed image is encoded afresh
    assert "encode probe-oracle" in run("probe-oracle")
    assert len(set(cache.iterdir()) - before) == 3


def test_benchmark_options_are_checked(tmp_path, env):
    data = cirr_fixture(tmp_path / "cirr")
    assert "needs --data DIR" in refused(env, "cirr", data, "--data", str(data))
    assert "leave out --k and --rerank" in refused(env, "cirr", data, "--k", "1,2")
    assert "--limit must be at least 1" in refusal("cirr", data, limit=0)
    assert "unknown benchmark 'cir'" in refusal("cir", data)
    limited = evaluate(env, "cirr", data, "--limit", "1", models="probe-oracle")
    assert limited[("probe-oracle", "val")]["queries"] == 1 and limited[("probe-oracle", "val")]["candidates"] == 8
    assert not any(r.get("published") for r in limited.values())


def test_limit_keeps_exactly_n_queries_spread_over_the_classes(tmp_path):
    data = write_imagefolder(tmp_path / "folder", {f"c{i}": i for i in range(10)}, per_class=100)
    queries = read_benchmark("imagefolder", data, limit=600).tasks[0].queries
    assert len(queries) == 600 and {q.positives[0] for q in queries} == {f"c{i}" for i in range(10)}


def test_an_item_that_cannot_be_read_is_tried_again_next_run(tmp_path, env):
    """A symlink that leads out of --data is refused, with the way out, before anything is encoded; and what the
    encode job could not read is not kept, so the next run tries it again."""
    data = cirr_fixture(tmp_path / "cirr")
    outside = tmp_path / "elsewhere.png"
    os.rename(data / "dev" / "dev-5-0-img1.png", outside)
    os.symlink(outside, data / "dev" / "dev-5-0-img1.png")
    assert "--follow-symlinks" in refused(env, "cirr", data)
    rows = evaluate(env, "cirr", data, "--follow-symlinks", models="probe-oracle")
    assert rows[("probe-oracle", "val")]["metrics"]["hit@1"] == 1.0
    outside.write_bytes(b"not an image")  # found only when the encode job opens it
    proc = subprocess.run([str(RETRIEVAL), "eval", "cirr", "--data", str(data), "--model", "probe-oracle",
                           "--follow-symlinks"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: cirr: 1 of 10 items")
    stores = Path(env["RETRIEVAL_CACHE"]).glob("benchmarks/cirr/*/manifest.json")
    assert all(json.loads(m.read_text())["errors"] == 0 for m in stores)  # the failed store was not kept
    image(outside, 25)
    assert evaluate(env, "cirr", data, "--follow-symlinks", models="probe-oracle")[("probe-oracle", "val")]
