"""The generated ShapesWorld benchmark data, checked by recomputation (Digits: test_digits_data.py).

Nothing here trusts the generator's own bookkeeping: scenes are redrawn with `make_scenes`, TGIT
instructions are parsed back into transformations and re-applied to the query image, VQA answers
and `pos` crops are recomputed from the scene objects. The CLI (`retrieval data make`) is tested in
test_benchmark_data_cli.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
from PIL import Image

from evaluation.scenes import Scene, Shape, cell_crop, draw_scene, make_scenes, split_of
from evaluation.shapesworld import make_shapesworld
from evaluation.tasks import Task, read_task
from evaluation.transforms import Transform

N, SIZE = 300, 32
SHAPE_NAMES = ("circle", "square", "triangle", "star", "cross")
COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
POSITION_NAMES = ("upper left", "upper center", "upper right", "middle left", "center", "middle right",
                  "lower left", "lower center", "lower right")
NUMBER_WORDS = ("zero", "one", "two", "three")
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross"}

# FuseLIP's TGIT instruction strings (reference §3.1), and the candidate count of each type's eval group
CROP_ROWS, CROP_COLS = ("upper", "center", "lower"), ("left", "center", "right")
CROP_RE = re.compile(r"crop to (upper|center|lower) (left|center|right)")
ROTATE_RE = re.compile(r"rotate ([1-9]0) degrees (clockwise|counter-clockwise)")
JITTER_RE = re.compile(r"(increase|decrease) brightness by factor (\d\.\d) and (increase|decrease) contrast by factor "
                       r"(\d\.\d) and (increase|decrease) saturation by factor (\d\.\d)")
EVAL_CANDIDATES = {"crop": 9, "rotate": 18, "jitter": 10, "flip": 4, "color": 2}
TRAIN_GROUP_MAX = {"crop": 9, "rotate": 3, "jitter": 3, "flip": 4, "color": 2}

OBJECT_RE = re.compile(rf"\ba (small|large) ({'|'.join(COLOUR_NAMES)}) ({'|'.join(SHAPE_NAMES)})\b")
WHERE = r"(?:in the|at the|placed in the) {}(?: part)?"


# ---------------------------------------------------------------------------------------------------- helpers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@cache
def _pixels(path: str) -> tuple[tuple[int, int], str, bytes]:
    with Image.open(path) as im:
        im.load()
        return im.size, im.mode, im.convert("RGB").tobytes()


def pixels(path: str | Path) -> tuple[tuple[int, int], bytes]:
    """(size, RGB bytes) of an image file, resolved so that two spellings of one path share the cache."""
    size, _, data = _pixels(str(Path(path).resolve()))
    return size, data


def as_pixels(image: Image.Image) -> tuple[tuple[int, int], bytes]:
    return image.size, image.convert("RGB").tobytes()


def load(path: str | Path) -> Image.Image:
    size, data = pixels(path)
    return Image.frombytes("RGB", size, data)


def digest_tree(root: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob(pattern))}


def scene_index(sid: str) -> int:
    m = re.fullmatch(r"shapes-(\d{6})", sid)
    assert m, sid
    return int(m[1])


def mentions(text: str, o: Shape) -> bool:
    """The caption names this object with its size, colour, shape and position."""
    phrase = re.escape(f"a {o.size} {o.colour} {o.shape}")
    where = WHERE.format(re.escape(o.position))
    return re.search(rf"\b{phrase} {where}(?![a-z])|\b{where}, {phrase}\b", text) is not None


def describes(text: str, scene: Scene) -> bool:
    """Every object of the scene is named, with its position, and no other object is."""
    return len(OBJECT_RE.findall(text)) == len(scene.objects) and all(mentions(text, o) for o in scene.objects)


def parse_instruction(text: str) -> Transform:
    """A TGIT instruction back into the transformation it names; ValueError if it is not in FuseLIP's format."""
    if m := CROP_RE.fullmatch(text):
        return Transform("crop", (CROP_ROWS.index(m[1]), CROP_COLS.index(m[2])))
    if m := ROTATE_RE.fullmatch(text):
        return Transform("rotate", (int(m[1]), m[2] == "clockwise"))
    if m := JITTER_RE.fullmatch(text):
        factors = tuple(float(m[i]) for i in (2, 4, 6))
        for word, f in zip((m[1], m[3], m[5]), factors):
            if not (0.3 <= f <= 2.0 and f != 1.0 and (word == "increase") == (f > 1)):
                raise ValueError(f"bad jitter factor {word} {f} in {text!r}")
        return Transform("jitter", factors)
    kinds = {"horizontal flip": "hflip", "vertical flip": "vflip", "grayscale": "grayscale", "colorize": "colorize"}
    if text in kinds:
        return Transform(kinds[text])
    raise ValueError(f"not a TGIT instruction: {text!r}")


def tgit_type(t: Transform) -> str:
    return {"hflip": "flip", "vflip": "flip", "grayscale": "color", "colorize": "color"}.get(t.kind, t.kind)


def gray(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


def expected_target(t: Transform, query: Image.Image, source: Image.Image) -> Image.Image:
    """What the instruction turns the query into; `colorize` (gray → colour) gives back the colour source."""
    if t.kind == "colorize":
        assert as_pixels(gray(source)) == as_pixels(query), "colorize query is not the grayscale of its source"
        return source
    return t.apply(query)


def answer(question: str, scene: Scene) -> tuple[str, str]:
    """(type, answer) of a VQA question, recomputed from the scene objects; the question must be unambiguous."""
    objs = scene.objects
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (o,) = [o for o in objs if o.shape == m[1]]
        return "colour", o.colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (o,) = [o for o in objs if o.colour == m[1]]
        return "shape", o.shape
    if question == "how many objects are there?":
        return "count", NUMBER_WORDS[len(objs)]
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return "count", NUMBER_WORDS[sum(o.shape == PLURALS[m[1]] for o in objs)]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "presence", "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        (o,) = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])]
        return "position", POSITION_NAMES[o.cell[0] * 3 + o.cell[1]]
    raise AssertionError(f"unknown question form: {question!r}")


def twin_pair(scene: Scene) -> tuple[Shape, Shape] | None:
    """(left, right) objects of the one shape that occurs exactly twice, if they sit in different columns and look
    different (which is when a `pos` query can be asked)."""
    for shape, count in Counter(o.shape for o in scene.objects).items():
        if count == 2:
            a, b = sorted((o for o in scene.objects if o.shape == shape), key=lambda o: o.cell[1])
            if a.cell[1] != b.cell[1] and (a.colour, a.size) != (b.colour, b.size):
                return a, b
    return None


def contiguous_blocks(labels: list[str]) -> list[tuple[str, int]]:
    return [(k, len(list(g))) for k, g in itertools.groupby(labels)]


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sw(tmp_path_factory) -> Path:
    """ShapesWorld, n=300 at 32 px, seed 0, with training pairs."""
    root = tmp_path_factory.mktemp("sw") / "data"
    make_shapesworld(root, n=N, size=SIZE, seed=0, train_pairs=True, progress=False)
    return root


@pytest.fixture(scope="module")
def sw_again(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw_again") / "data"
    make_shapesworld(root, n=N, size=SIZE, seed=0, train_pairs=True, progress=False)
    return root


@pytest.fixture(scope="module")
def sw_seed1(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw_seed1") / "data"
    make_shapesworld(root, n=N, size=SIZE, seed=1, train_pairs=False, progress=False)
    return root


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return make_scenes(N, 0)


@pytest.fixture(scope="module")
def corpus(sw) -> list[dict]:
    return read_jsonl(sw / "corpus.jsonl")


@pytest.fixture(scope="module")
def tasks(sw) -> dict[str, Task]:
    return {name: read_task(sw / "tasks" / name) for name in ("t2i", "i2t", "tgit", "tgit-pool", "vqa", "pos")}


@pytest.fixture(scope="module")
def pairs(sw) -> list[dict]:
    return read_jsonl(sw / "train" / "pairs.jsonl")


# ---------------------------------------------------------------------------------------------------- determinism


@pytest.mark.slow  # generates the data a second time: 10 s
def test_same_seed_gives_byte_identical_folders(sw, sw_again):
    for name in ("corpus.jsonl", "train/pairs.jsonl", "dataset.json"):
        assert (sw / name).read_bytes() == (sw_again / name).read_bytes(), name
    task_files = digest_tree(sw, "tasks/*/*")
    assert len(task_files) == 6 * 3
    assert task_files == digest_tree(sw_again, "tasks/*/*")
    images = digest_tree(sw, "**/*.png")
    assert len(images) > N
    assert hashlib.sha256(json.dumps(images, sort_keys=True).encode()).hexdigest() == \
        hashlib.sha256(json.dumps(digest_tree(sw_again, "**/*.png"), sort_keys=True).encode()).hexdigest()


def test_another_seed_gives_other_scenes(sw, sw_seed1, corpus):
    other = read_jsonl(sw_seed1 / "corpus.jsonl")
    assert len(other) == len(corpus) == N
    keys0 = {s.key for s in make_scenes(N, 0)}
    keys1 = {s.key for s in make_scenes(N, 1)}
    assert len(keys0 & keys1) < N // 10
    assert sum(a["text"] == b["text"] for a, b in zip(corpus, other)) < N // 10
    same_images = sum(pixels(sw / a["image"]) == pixels(sw_seed1 / b["image"]) for a, b in zip(corpus, other))
    assert same_images < N // 10


def test_no_train_pairs_writes_none(sw_seed1):
    meta = json.loads((sw_seed1 / "dataset.json").read_text())
    assert meta["train_pairs"] is None and meta["train_groups"] is None
    assert not (sw_seed1 / "train").exists()


# ---------------------------------------------------------------------------------------------------- scenes, splits


def test_scenes_are_distinct_and_match_the_corpus(sw, corpus, scenes):
    assert len({s.key for s in scenes}) == len(scenes) == len(corpus) == N
    for i, (row, scene) in enumerate(zip(corpus, scenes)):
        assert row["id"] == f"shapes-{i:06d}"
        assert row["n_objects"] == len(scene.objects)
        assert row["shapes"] == " ".join(sorted({o.shape for o in scene.objects}))
        assert row["colours"] == " ".join(sorted({o.colour for o in scene.objects}))
        assert row["background"] == (scene.background.texture or scene.background.base)
        assert not Path(row["image"]).is_absolute()
        assert pixels(sw / row["image"]) == as_pixels(draw_scene(scene, SIZE)), row["id"]


def test_corpus_splits_are_contiguous_80_10_10(sw, corpus):
    assert contiguous_blocks([r["split"] for r in corpus]) == [("train", 240), ("val", 30), ("test", 30)]
    meta = json.loads((sw / "dataset.json").read_text())
    assert meta["splits"] == {"train": 240, "val": 30, "test": 30}
    assert (meta["name"], meta["n"], meta["size"], meta["seed"], meta["items"]) == ("shapesworld", N, SIZE, 0, N)


@pytest.mark.parametrize("n", [*range(10, 60), 99, 101, 999, 1797, 2000])
def test_split_of_is_contiguous_and_never_empty(n):
    blocks = contiguous_blocks([split_of(i, n) for i in range(n)])
    assert [k for k, _ in blocks] == ["train", "val", "test"]
    counts = dict(blocks)
    assert abs(counts["train"] - 0.8 * n) <= 1 and abs(counts["val"] - 0.1 * n) <= 1
    assert abs(counts["test"] - 0.1 * n) <= 1


def test_splits_never_share_a_scene(corpus, scenes):
    by_split: dict[str, set] = {}
    for row, scene in zip(corpus, scenes):
        by_split.setdefault(row["split"], set()).add(scene.key)
    for a, b in itertools.combinations(by_split, 2):
        assert not by_split[a] & by_split[b], (a, b)


def test_captions_name_every_object_and_vary(corpus, scenes):
    for row, scene in zip(corpus, scenes):
        assert describes(row["text"], scene), (row["id"], row["text"], scene.objects)
    positions = "|".join(sorted(map(re.escape, POSITION_NAMES), key=len, reverse=True))
    skeletons = Counter(re.sub(positions, "P", OBJECT_RE.sub("O", r["text"])) for r in corpus)
    assert len(skeletons) >= 50
    assert skeletons.most_common(1)[0][1] <= N // 10
    openings = Counter(" ".join(r["text"].split()[:2]) for r in corpus)
    assert len(openings) >= 6


# ---------------------------------------------------------------------------------------------------- TGIT


def test_tgit_ground_truth_is_recomputed_exactly(sw, corpus, tasks):
    task = tasks["tgit"]
    assert (task.kind, task.primary, task.by_type) == ("candidates", "top1", True)
    cands = {c.id: c for c in task.candidates}
    assert len(cands) == len(task.candidates)
    seen_types: Counter = Counter()
    per_scene: dict[str, list[str]] = {}
    for q in task.queries:
        m = re.fullmatch(r"(shapes-\d{6})-(\w+)-q", q.item.id)
        assert m, q.item.id
        sid, kind = m[1], m[2]
        row = corpus[scene_index(sid)]
        assert row["split"] == "test"
        per_scene.setdefault(sid, []).append(q.type)
        t = parse_instruction(q.item.text)
        assert tgit_type(t) == q.type == kind
        assert len(q.candidates) == EVAL_CANDIDATES[q.type], q.item.id
        assert len(q.positives) == 1 and q.positives[0] in q.candidates
        assert all(c.startswith(sid + "-") for c in q.candidates)
        source = load(sw / row["image"])
        query = load(q.item.image)
        if t.kind != "colorize":
            assert as_pixels(query) == as_pixels(source), f"{q.item.id}: query is not its scene's image"
        want = as_pixels(expected_target(t, query, source))
        assert pixels(cands[q.positives[0]].image) == want, f"{q.item.id} ({q.item.text}): wrong positive"
        others = [c for c in q.candidates if c != q.positives[0]]
        assert all(pixels(cands[c].image) != want for c in others), f"{q.item.id}: a negative equals the target"
        # the candidates are the transformations of this one image (the jitter factors are not known here)
        got = sorted(pixels(cands[c].image)[1] for c in q.candidates)
        group = {"crop": [Transform("crop", (r, c)).apply(source) for r in range(3) for c in range(3)],
                 "rotate": [Transform("rotate", (d, cw)).apply(source) for cw in (True, False)
                            for d in range(10, 100, 10)],
                 "flip": [source.transpose(Image.FLIP_LEFT_RIGHT), source.transpose(Image.FLIP_TOP_BOTTOM), source,
                          source],
                 "color": [gray(source), source]}.get(q.type)
        if group is not None:
            assert got == sorted(as_pixels(g)[1] for g in group), q.item.id
        seen_types[q.type] += 1
    test_ids = [r["id"] for r in corpus if r["split"] == "test"]
    assert set(per_scene) <= set(test_ids) and len(per_scene) >= len(test_ids) - 1
    assert all(len(v) == len(set(v)) for v in per_scene.values())  # at most one query per type and scene
    assert set(seen_types) == set(EVAL_CANDIDATES) and min(seen_types.values()) >= len(test_ids) // 2


def test_tgit_instructions_follow_fuselip_format(tasks, pairs):
    texts = [q.item.text for q in tasks["tgit"].queries]
    texts += [p["query_text"] for p in pairs if p["task"].startswith("tgit-")]
    kinds = Counter()
    for text in texts:
        kinds[parse_instruction(text).kind] += 1
    assert set(kinds) == {"crop", "rotate", "jitter", "hflip", "vflip", "grayscale", "colorize"}
    factors = [float(f) for text in texts for f in re.findall(r"factor (\d\.\d)", text)]
    assert factors and min(factors) >= 0.3 and max(factors) <= 2.0 and 1.0 not in factors
    assert len(set(factors)) >= 12  # drawn over the range, not a few fixed values


@pytest.mark.parametrize("text", ["crop to middle left", "crop to upper  left", "rotate 100 degrees clockwise",
                                  "rotate 15 degrees clockwise", "rotate 10 degrees anticlockwise",
                                  "increase brightness by factor 1.0 and increase contrast by factor 1.2 and "
                                  "increase saturation by factor 1.3",
                                  "increase brightness by factor 0.8 and increase contrast by factor 1.2 and "
                                  "increase saturation by factor 1.3",
                                  "decrease brightness by factor 0.25 and increase contrast by factor 1.2 and "
                                  "increase saturation by factor 1.3", "Horizontal flip", "greyscale"])
def test_instruction_parser_rejects_other_strings(text):
    with pytest.raises(ValueError):
        parse_instruction(text)


def test_transform_instructions_round_trip():
    ts = [Transform("crop", (r, c)) for r in range(3) for c in range(3)]
    ts += [Transform("rotate", (d, cw)) for d in range(10, 100, 10) for cw in (True, False)]
    ts += [Transform("jitter", (0.3, 2.0, 1.1)), Transform("jitter", (0.9, 1.5, 0.5))]
    ts += [Transform(k) for k in ("hflip", "vflip", "grayscale", "colorize")]
    for t in ts:
        assert parse_instruction(t.instruction) == t


def test_tgit_pool_has_the_same_queries(tasks):
    tgit, pool = tasks["tgit"], tasks["tgit-pool"]
    assert (pool.kind, pool.primary, pool.by_type) == ("pool", "top1", True)
    # the same queries, less those whose answer has a look-alike elsewhere in the pool (checked below)
    by_id = {q.item.id: q for q in tgit.queries}
    assert len(tgit.queries) - 5 <= len(pool.queries) <= len(tgit.queries)
    for b in pool.queries:
        a = by_id[b.item.id]
        assert b.candidates is None
        assert (a.item.id, a.item.text, a.positives, a.type) == (b.item.id, b.item.text, b.positives, b.type)
        assert Path(a.item.image).resolve() == Path(b.item.image).resolve()
    ids = [c.id for c in pool.candidates]
    assert len(ids) == len(set(ids))
    paths = [str(Path(c.image).resolve()) for c in pool.candidates]
    assert len(paths) == len(set(paths)), "an image is in the pool twice"
    assert all(not c.text for c in pool.candidates)


def test_tgit_pool_holds_every_candidate_image(tasks):
    in_pool = {str(Path(c.image).resolve()) for c in tasks["tgit-pool"].candidates}
    every = {str(Path(c.image).resolve()) for c in tasks["tgit"].candidates}
    assert in_pool == every, sorted(every - in_pool)


def test_tgit_pool_positives_look_unique_in_the_pool(tasks):
    pool = tasks["tgit-pool"]
    looks = Counter(pixels(c.image) for c in pool.candidates)
    by_id = {c.id: c for c in pool.candidates}
    ambiguous = [q.item.id for q in pool.queries if looks[pixels(by_id[q.positives[0]].image)] > 1]
    assert not ambiguous


# ---------------------------------------------------------------------------------------------------- pos


def test_pos_positive_is_the_named_objects_crop(sw, corpus, scenes, tasks):
    task = tasks["pos"]
    assert (task.kind, task.primary) == ("candidates", "top1")
    cands = {c.id: c for c in task.candidates}
    assert len(cands) == len(task.candidates)
    asked = Counter()
    for q in task.queries:
        m = re.fullmatch(rf"the ({'|'.join(SHAPE_NAMES)}) on the (left|right)", q.item.text)
        assert m, q.item.text
        shape, side = m[1], m[2]
        assert q.type == side
        sid = re.fullmatch(r"(shapes-\d{6})-(left|right)", q.item.id)[1]
        i = scene_index(sid)
        assert corpus[i]["split"] == "test"
        image = load(q.item.image)
        assert as_pixels(image) == pixels(sw / corpus[i]["image"])
        same = sorted((o for o in scenes[i].objects if o.shape == shape), key=lambda o: o.cell[1])
        assert len(same) == 2 and same[0].cell[1] < same[1].cell[1], (q.item.id, scenes[i].objects)
        target, other = same if side == "left" else same[::-1]
        crops = {(r, c): as_pixels(cell_crop(image, (r, c))) for r in range(3) for c in range(3)}
        assert len(q.positives) == 1 and q.positives[0] in q.candidates
        positive = pixels(cands[q.positives[0]].image)
        assert positive == crops[target.cell], q.item.id
        candidate_looks = [pixels(cands[c].image) for c in q.candidates]
        assert all(look in crops.values() for look in candidate_looks), "a candidate is not a crop of this image"
        assert crops[other.cell] in candidate_looks, "the other same-shape object is not a candidate"
        assert candidate_looks.count(positive) == 1
        assert all(c.startswith(sid + "-") for c in q.candidates)
        asked[i] += 1
    with_twins = {i for i, r in enumerate(corpus) if r["split"] == "test" and twin_pair(scenes[i])}
    assert with_twins and asked == Counter({i: 2 for i in with_twins})


# ---------------------------------------------------------------------------------------------------- vqa


def test_vqa_answers_are_recomputed_from_the_scene(corpus, scenes, tasks):
    task = tasks["vqa"]
    assert task.kind == "pool"
    answers = {c.id: c.text for c in task.candidates}
    assert len(answers) == len(task.candidates) == len(set(answers.values()))
    assert all(c.image is None for c in task.candidates)
    types = Counter()
    per_scene: dict[int, list[str]] = {}
    for q in task.queries:
        sid = re.fullmatch(r"(shapes-\d{6})-vqa\d+", q.item.id)[1]
        i = scene_index(sid)
        assert corpus[i]["split"] == "test"
        assert Path(q.item.image).resolve() == (Path(task.root).parents[1] / corpus[i]["image"]).resolve()
        kind, truth = answer(q.item.text, scenes[i])
        assert q.type == kind
        assert len(q.positives) == 1 and q.positives[0] in answers
        assert answers[q.positives[0]] == truth, (q.item.id, q.item.text, scenes[i].objects)
        types[kind] += 1
        per_scene.setdefault(i, []).append(kind)
    assert set(types) == {"colour", "shape", "count", "presence", "position"}
    assert len(per_scene) == 30 and all(len(v) == len(set(v)) for v in per_scene.values())
    assert all({"count", "presence"} <= set(v) for v in per_scene.values())
    assert {"yes", "no"} <= {answers[q.positives[0]] for q in task.queries if q.type == "presence"}


# ---------------------------------------------------------------------------------------------------- t2i / i2t


def test_t2i_and_i2t_positives(sw, corpus, scenes, tasks):
    t2i, i2t = tasks["t2i"], tasks["i2t"]
    test = {r["id"]: i for i, r in enumerate(corpus) if r["split"] == "test"}
    images = {c.id: c for c in t2i.candidates}
    assert set(images) == set(test) and len(t2i.candidates) == len(test)
    for sid, c in images.items():
        assert Path(c.image).resolve() == (sw / corpus[test[sid]]["image"]).resolve() and not c.text
    assert len(t2i.queries) == 2 * len(test)
    for q in t2i.queries:
        assert q.item.image is None and q.item.text
        owners = [sid for sid, i in test.items() if describes(q.item.text, scenes[i])]
        assert list(q.positives) == owners, (q.item.id, q.item.text)
    captions = {c.id: c.text for c in i2t.candidates}
    assert len(captions) == len(i2t.candidates) == 2 * len(test)
    assert all(c.image is None for c in i2t.candidates)
    assert len(i2t.queries) == len(test)
    for q in i2t.queries:
        sid = q.item.id.removesuffix("-q")
        i = test[sid]
        assert Path(q.item.image).resolve() == (sw / corpus[i]["image"]).resolve() and not q.item.text
        described = {cid for cid, text in captions.items() if describes(text, scenes[i])}
        assert set(q.positives) == described and len(q.positives) == 2
        assert corpus[i]["text"] in {captions[p] for p in q.positives}
    assert sorted(t.text for t in i2t.candidates) == sorted(q.item.text for q in t2i.queries)


# ---------------------------------------------------------------------------------------------------- training pairs


def test_training_pairs_groups_and_paths(sw, corpus, scenes, pairs):
    base = sw / "train"
    train = [r["id"] for r in corpus if r["split"] == "train"]
    runs = [g for g, _ in itertools.groupby(p["group"] for p in pairs)]
    assert len(runs) == len(set(runs)), "a group's pairs are not contiguous"
    assert runs == train, "groups are not exactly the train scenes"
    meta = json.loads((sw / "dataset.json").read_text())
    assert (meta["train_pairs"], meta["train_groups"]) == (len(pairs), len(train))
    by_group_task: Counter = Counter()
    for p in pairs:
        i = scene_index(p["group"])
        own = (sw / corpus[i]["image"]).resolve()
        for key in ("query_image", "target_image"):
            if p[key]:
                path = (base / p[key]).resolve()
                assert path.is_file(), p
                assert path == own or path.is_relative_to(base.resolve() / "tgit" / p["group"]) or \
                    path.is_relative_to(base.resolve() / "pos" / p["group"]), f"{p} uses another scene's image"
        assert p["query_image"] and (p["target_image"] or p["target_text"])
        by_group_task[p["group"], p["task"]] += 1
        if p["task"] == "caption":
            assert (base / p["query_image"]).resolve() == own and p["target_text"] == corpus[i]["text"]
        elif p["task"].startswith("vqa-"):
            kind, truth = answer(p["query_text"], scenes[i])
            assert (p["task"], p["target_text"]) == (f"vqa-{kind}", truth), p
        elif p["task"] == "pos":
            m = re.fullmatch(r"the (\w+) on the (left|right)", p["query_text"])
            left, right = twin_pair(scenes[i])
            o = left if m[2] == "left" else right
            assert o.shape == m[1]
            assert pixels(base / p["target_image"]) == as_pixels(cell_crop(load(own), o.cell))
        else:
            assert p["task"].removeprefix("tgit-") in TRAIN_GROUP_MAX, p["task"]
    for sid in train:
        assert by_group_task[sid, "caption"] == 1
        assert by_group_task[sid, "tgit-flip"] == 4 and by_group_task[sid, "tgit-color"] == 2
        for kind, most in TRAIN_GROUP_MAX.items():
            assert 1 <= by_group_task[sid, f"tgit-{kind}"] <= most
        assert by_group_task[sid, "pos"] == (2 if twin_pair(scenes[scene_index(sid)]) else 0)


def test_training_tgit_targets_are_the_named_transformation(sw, corpus, pairs):
    base = sw / "train"
    groups = sorted({p["group"] for p in pairs})[::20]
    assert len(groups) >= 10
    checked = Counter()
    for p in pairs:
        if p["group"] not in groups or not p["task"].startswith("tgit-"):
            continue
        t = parse_instruction(p["query_text"])
        assert p["task"] == f"tgit-{tgit_type(t)}"
        source = load(sw / corpus[scene_index(p["group"])]["image"])
        query = load(base / p["query_image"])
        want = as_pixels(expected_target(t, query, source))
        assert pixels(base / p["target_image"]) == want, p
        checked[t.kind] += 1
    assert set(checked) == {"crop", "rotate", "jitter", "hflip", "vflip", "grayscale", "colorize"}
