"""FashionIQ (Wu et al., CVPR 2021) validation split, from its release layout (github.com/XiaoxiaoGuo/fashion-iq):

    DATA/captions/cap.<category>.val.json        [{candidate, target, captions: [two texts]}, …]
    DATA/image_splits/split.<category>.val.json  [image name, …]   the gallery of that category
    DATA/images/<name>.jpg                       (CLIP4Cir's flat folder) or DATA/resized_images/<category>/<name>.jpg

Per category (dress, shirt, toptee), a query is the candidate (reference) image with its two relative
captions joined as CLIP4Cir's validate.py does: the first stripped of ". ? , " and capitalised, " and ", the
second stripped; it ranks the category's whole validation gallery (the reference stays in, as there).
Recall@10 and Recall@50 per category and their mean over the three.
"""

from __future__ import annotations

from pathlib import Path

from evaluation.benchmarks.layout import Benchmark, Layout, Summary, limited, pick_subsets
from evaluation.tasks import Item, Query, Task

CATEGORIES = ("dress", "shirt", "toptee")
KS = (10, 50)


def join_captions(first: str, second: str) -> str:
    """The two relative captions as one modification text (CLIP4Cir's deterministic order)."""
    return f"{first.strip('.?, ').capitalize()} and {second.strip('.?, ')}"


def _image_folder(layout: Layout, category: str) -> Path:
    for folder in (layout.root / "images", layout.root / "resized_images" / category):
        if folder.is_dir():
            return folder
    raise layout.refuse(f"images/ (or resized_images/{category}/) is missing")


def _read_category(layout: Layout, category: str, limit: int | None) -> Task:
    folder = _image_folder(layout, category)
    split = f"image_splits/split.{category}.val.json"
    names = layout.json(split, list)
    if not all(isinstance(n, str) for n in names):
        raise layout.refuse(f"{split} must list image names")
    gallery = {n: Item(n, layout.image(f"{n}.jpg", f"{split} entry {n!r}", under=folder)) for n in names}
    queries = []
    captions = f"captions/cap.{category}.val.json"
    for n, entry in enumerate(layout.json(captions, list)):
        where = f"{captions} entry {n}"
        reference = layout.value(entry, "candidate", str, where)
        target = layout.value(entry, "target", str, where)
        texts = layout.strings(entry, "captions", where)
        if len(texts) != 2:
            raise layout.refuse(f"{where} has {len(texts)} captions, not two")
        unknown = [name for name in (reference, target) if name not in gallery]
        if unknown:
            raise layout.refuse(f"{where} names image {unknown[0]!r}, which {split} lacks")
        queries.append(Query(Item(f"{category}-{n}", gallery[reference].image, join_captions(*texts)), (target,)))
    if not queries:
        raise layout.refuse(f"{captions} has no queries")
    return Task(category, "fashioniq", "pool", "hit@10", f"FashionIQ {category} val: Recall@10/50 over the gallery",
                limited(queries, limit), list(gallery.values()), extra={"ks": list(KS)})


def read_fashioniq(root: Path, subsets: list[str] | None, limit: int | None, protocol: str) -> Benchmark:
    layout = Layout("fashioniq", root, "FashionIQ: captions/cap.<category>.val.json, "
                                       "image_splits/split.<category>.val.json, images/")
    chosen = pick_subsets("fashioniq", CATEGORIES, subsets)
    tasks = [_read_category(layout, c, limit) for c in chosen]
    layout.check_images(tasks)
    summaries = [Summary("average", tuple(chosen), defined=len(CATEGORIES))] if len(chosen) > 1 \
        else []
    return Benchmark("fashioniq", root, protocol, tasks, summaries)
