"""MMEB-eval (TIGER-Lab/MMEB-eval, the VLM2Vec paper's 36 image tasks) from its Hugging Face layout.

    DATA/<Subset>/test-00000-of-00001.parquet   qry_text, qry_img_path, tgt_text (list), tgt_img_path (list)
    DATA/eval_images/<Subset>/…                 images.zip unpacked (or the subset folders right under DATA)

Each query ranks its own candidate list, whose first entry is the positive; the score is precision@1
(VLM2Vec's evaluation/eval_clip.py and eval_utils.get_pred: argmax == 0). Items are embedded once per
distinct (text, image) as VLM2Vec's EvalDataset.get_paired_data does, so a candidate identical to the positive
is the positive, as MMEB's argmax (the first index) makes it. Other exact ties count at their expected value,
where argmax would give them to the positive. Category scores are unweighted means over their subsets.

Protocol `mmeb` passes the texts as MMEB's own code does (instruction and `<|image_1|>` marker included);
`fuselip` applies FuseLIP's evaluation changes (mmeb_fuselip.json): instructions erased except HatefulMemes'
question, class-name prefixes on the candidates, ImageNet-1K names cut at the first comma.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from evaluation.benchmarks.layout import Benchmark, Layout, Summary, limited, pick_subsets
from evaluation.tasks import Item, Query, Task
from retrieval.files import read_json

CATEGORIES = {
    "Classification": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                       "ImageNet-R", "ObjectNet", "Country211"),
    "VQA": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
            "TextVQA"),
    "Retrieval": ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
                  "WebQA", "OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ"),
    "Grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
SUBSETS = tuple(s for members in CATEGORIES.values() for s in members)
EXTRA_SUBSETS = ("CIFAR-100",)  # published with MMEB-eval, outside its 36 and its averages
COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
FUSELIP = Path(__file__).with_name("mmeb_fuselip.json")


class FuseLIPTexts:
    """FuseLIP's text changes (src/mmeb/mmeb_utils.py TxtModifier, as src/fuse_eval/eval_all.py sets it up)."""

    def __init__(self) -> None:
        spec = read_json(FUSELIP)
        self.replacements = [tuple(pair) for pair in spec["replacements"]]  # in order: plain substring replaces
        self.prefixes: dict[str, str] = spec["target_prefixes"]
        self.cut = set(spec["cut_at_first_comma"])

    def __call__(self, text: str, subset: str, target: bool) -> str:
        for old, new in self.replacements:
            text = text.replace(old, new)
        if subset in self.cut:
            text = text.split(",")[0]
        if target:
            text = self.prefixes.get(subset, "") + text
        return text.rstrip("\n").strip()


def _texts(value: Any, n: int) -> list[str] | None:
    """tgt_text as a list the length of tgt_img_path (MMEB's CLIP baseline reads a bare "" as n empty texts)."""
    if value == "":
        return [""] * n
    if isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value):
        return value
    return None


def _read_subset(layout: Layout, images: Path, subset: str, limit: int | None, fuselip: FuseLIPTexts | None
                 ) -> Task:
    files = sorted((layout.root / subset).glob("test-*.parquet"))
    if not files:
        raise layout.refuse(f"{subset}/test-00000-of-00001.parquet is missing")
    rows: list[dict[str, Any]] = []
    for path in files:
        where = path.relative_to(layout.root)
        try:
            table = pq.read_table(path)
        except Exception as e:  # a truncated or foreign file: pyarrow's own words
            raise layout.refuse(f"{where} is not Parquet ({type(e).__name__}: {e})") from None
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise layout.refuse(f"{where} has no column {missing[0]!r}")
        rows += table.select(list(COLUMNS)).to_pylist()
    items: dict[tuple[str | None, str | None], Item] = {}

    def item(text: str, image: str, target: bool, where: str) -> Item:
        text = fuselip(text, subset, target) if fuselip else text
        path = layout.image(image, where, under=images) if image else None
        if path is None and not text.strip():
            raise layout.refuse(f"{where}: an item with neither text nor image")
        key = (path, text or None)
        if key not in items:
            items[key] = Item(f"{subset}/{len(items)}", path, text or None)
        return items[key]

    queries = []
    for n, row in enumerate(rows):
        where = f"{subset} row {n}"
        paths, texts = row["tgt_img_path"], _texts(row["tgt_text"], len(row["tgt_img_path"] or []))
        if not isinstance(row["qry_text"], str) or not isinstance(row["qry_img_path"], str):
            raise layout.refuse(f"{where}: qry_text and qry_img_path must be strings")
        if not paths or not all(isinstance(p, str) for p in paths) or texts is None:
            raise layout.refuse(f"{where}: tgt_text and tgt_img_path must be lists of strings of one length")
        candidates = [item(t, p, True, where) for t, p in zip(texts, paths)]
        positive = candidates[0].id  # identical candidates share the id, so the positive's twins are positives
        queries.append(Query(item(row["qry_text"], row["qry_img_path"], False, where), (positive,),
                             tuple(c.id for c in candidates)))
    if not queries:
        raise layout.refuse(f"{subset} has no rows")
    queries = limited(queries, limit)
    used = {c for q in queries for c in q.candidates}
    return Task(subset, "mmeb", "candidates", "top1", f"MMEB {subset}: precision@1 over each query's candidates",
                queries, [i for i in items.values() if i.id in used], extra={"ks": [1]})


def read_mmeb(root: Path, subsets: list[str] | None, limit: int | None, protocol: str) -> Benchmark:
    layout = Layout("mmeb", root, "MMEB-eval: <Subset>/test-00000-of-00001.parquet and eval_images/")
    chosen = pick_subsets("mmeb", SUBSETS + EXTRA_SUBSETS, subsets or list(SUBSETS))
    images = root / "eval_images" if (root / "eval_images").is_dir() else root
    fuselip = FuseLIPTexts() if protocol == "fuselip" else None
    tasks = [_read_subset(layout, images, s, limit, fuselip) for s in chosen]
    layout.check_images(tasks)
    summaries = []
    for category, members in [*CATEGORIES.items(), ("Overall", SUBSETS)]:
        present = tuple(s for s in members if s in chosen)
        if present:
            summaries.append(Summary(category, present, defined=len(members)))
    return Benchmark("mmeb", root, protocol, tasks, summaries)
