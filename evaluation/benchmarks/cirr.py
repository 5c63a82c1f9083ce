"""CIRR (Liu et al., ICCV 2021) validation split, from its release layout (github.com/Cuberick-Orion/CIRR):

    DATA/captions/cap.rc2.val.json        [{pairid, reference, target_hard, caption, img_set: {members}}, …]
    DATA/image_splits/split.rc2.val.json  {image name: "./dev/<name>.png"}
    DATA/dev/…                            (or DATA/img_raw/dev/…)

The annotations may also sit in DATA/cirr/ (the CLIP4Cir layout). A query is the reference image with the
modification text. Recall@K ranks every validation image but the reference (CLIP4Cir's
validate.compute_cirr_val_metrics, the convention of the later literature); Recall_subset@K ranks only the
query's image set, whose five other members hold the target. The label is `target_hard`.
"""

from __future__ import annotations

from pathlib import Path

from evaluation.benchmarks.layout import Benchmark, Layout, limited, no_subsets
from evaluation.tasks import Item, Query, Task

RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)


def read_cirr(root: Path, subsets: list[str] | None, limit: int | None, protocol: str) -> Benchmark:
    no_subsets("cirr", subsets)
    layout = Layout("cirr", root, "CIRR: captions/cap.rc2.val.json, image_splits/split.rc2.val.json, dev/")
    notes = "cirr/" if not (root / "captions").is_dir() and (root / "cirr" / "captions").is_dir() else ""
    images = root / "img_raw" if (root / "img_raw").is_dir() else root
    split = layout.json(f"{notes}image_splits/split.rc2.val.json", dict)
    gallery = {}
    for name, path in split.items():
        if not isinstance(path, str):
            raise layout.refuse(f"image_splits/split.rc2.val.json: {name!r} maps to a {type(path).__name__}")
        gallery[name] = Item(name, layout.image(path, f"split.rc2.val.json entry {name!r}", under=images))
    pool, subset = [], []
    for n, pair in enumerate(layout.json(f"{notes}captions/cap.rc2.val.json", list)):
        where = f"captions/cap.rc2.val.json entry {n}"
        pairid = layout.value(pair, "pairid", int, where)
        reference = layout.value(pair, "reference", str, where)
        target = layout.value(pair, "target_hard", str, where)
        caption = layout.value(pair, "caption", str, where)
        members = layout.strings(layout.value(pair, "img_set", dict, where), "members", f"{where} img_set")
        unknown = [name for name in (reference, target, *members) if name not in gallery]
        if unknown:
            raise layout.refuse(f"{where} names image {unknown[0]!r}, which split.rc2.val.json lacks")
        if target == reference or target not in members:
            raise layout.refuse(f"{where}: the target must differ from the reference and be in img_set")
        query = Item(f"pair-{pairid}", gallery[reference].image, caption)
        pool.append(Query(query, (target,), exclude=(reference,)))
        subset.append(Query(query, (target,), tuple(dict.fromkeys(m for m in members if m != reference))))
    if not pool:
        raise layout.refuse("captions/cap.rc2.val.json has no pairs")
    candidates = list(gallery.values())
    tasks = [Task("val", "cirr", "pool", "hit@1", "CIRR val: Recall@K over all val images but the reference",
                  limited(pool, limit), candidates, extra={"ks": list(RECALL_KS)}),
             Task("val-subset", "cirr", "candidates", "hit@1", "CIRR val: Recall_subset@K within the image set",
                  limited(subset, limit), candidates, extra={"ks": list(SUBSET_KS)})]
    layout.check_images(tasks)
    return Benchmark("cirr", root, protocol, tasks)
