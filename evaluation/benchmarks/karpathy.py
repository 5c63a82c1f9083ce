"""COCO and Flickr30k retrieval on Karpathy's test split (Karpathy & Fei-Fei, CVPR 2015), from its JSON files:

    DATA/dataset_coco.json       {images: [{filepath, filename, split, sentences: [{raw}, …]}, …]}
    DATA/val2014/…               COCO images under their `filepath`
    DATA/dataset_flickr30k.json  the same without filepath
    DATA/flickr30k-images/…      Flickr30k images (or right under DATA)

The test split has 5,000 (COCO) or 1,000 (Flickr30k) images with five captions each (the first five, as the
5N caption files of VSE++ hold; BLIP keeps every caption, a few more). Text → image: each caption ranks all
images, one positive. Image → text: each image ranks all captions; a hit is any of its five (VSE++
evaluation.i2t). COCO reports the 5k test and the 1k test — the mean over five folds of 1,000 consecutive
images (VSE++ evalrank fold5). rsum is R@1+R@5+R@10 of both directions.
"""

from __future__ import annotations

from pathlib import Path

from evaluation.benchmarks.layout import Benchmark, Layout, Summary, limited, no_subsets
from evaluation.tasks import Item, Query, Task

KS = (1, 5, 10)
CAPTIONS = 5
FOLD = 1000


def _tasks(images: list[Item], captions: list[list[Item]], suffix: str, limit: int | None) -> list[Task]:
    texts = [c for group in captions for c in group]
    t2i = [Query(c, (image.id,)) for image, group in zip(images, captions) for c in group]
    i2t = [Query(image, tuple(c.id for c in group)) for image, group in zip(images, captions)]
    extra = {"ks": list(KS)}
    return [Task(f"t2i{suffix}", "", "pool", "hit@1", "text → image Recall@K", limited(t2i, limit), images,
                 extra=extra),
            Task(f"i2t{suffix}", "", "pool", "hit@1", "image → text Recall@K (any of its captions)",
                 limited(i2t, limit), texts, extra=extra)]


def _read(name: str, file: str, image_folder: str | None, root: Path, limit: int | None) -> Benchmark:
    layout = Layout(name, root, f"Karpathy split: {file} and the images")
    data = layout.json(file, dict)
    entries = layout.value(data, "images", list, file)
    folder = root / image_folder if image_folder and (root / image_folder).is_dir() else root
    images, captions = [], []
    for n, entry in enumerate(entries):
        where = f"{file} image {n}"
        if layout.value(entry, "split", str, where) != "test":
            continue
        filename = layout.value(entry, "filename", str, where)
        relative = f"{layout.value(entry, 'filepath', str, where)}/{filename}" if name == "coco" else filename
        sentences = layout.value(entry, "sentences", list, where)
        if len(sentences) < CAPTIONS:
            raise layout.refuse(f"{where} has fewer than {CAPTIONS} sentences")
        raws = [layout.value(s, "raw", str, f"{where} sentence {j}").strip()
                for j, s in enumerate(sentences[:CAPTIONS])]
        if not all(raws):
            raise layout.refuse(f"{where} has an empty caption among its first {CAPTIONS}")
        image = Item(f"image-{n}", layout.image(relative, where, under=folder))
        images.append(image)
        captions.append([Item(f"caption-{n}-{j}", text=raw) for j, raw in enumerate(raws)])
    if not images:
        raise layout.refuse(f"{file} has no images in the 'test' split")
    if name == "flickr30k":
        tasks = _tasks(images, captions, "", limit)
        summaries = [Summary("rsum", ("t2i", "i2t"), "rsum")]
        folded: frozenset[str] = frozenset()
    else:
        size = "-5k" if len(images) == 5 * FOLD else ""  # the name the papers' figures go by
        tasks = _tasks(images, captions, size, limit)
        summaries = [Summary(f"rsum{size}", (f"t2i{size}", f"i2t{size}"), "rsum")]
        folds = [_tasks(images[i:i + FOLD], captions[i:i + FOLD], f"-1k-fold{i // FOLD}", limit)
                 for i in range(0, len(images) - FOLD + 1, FOLD)] if len(images) >= 2 * FOLD else []
        if folds:
            tasks += [t for pair in folds for t in pair]
            summaries += [Summary("t2i-1k", tuple(t.name for t, _ in folds)),
                          Summary("i2t-1k", tuple(t.name for _, t in folds)),
                          Summary("rsum-1k", ("t2i-1k", "i2t-1k"), "rsum")]
        folded = frozenset(t.name for pair in folds for t in pair)
    for task in tasks:
        task.dataset = name
    layout.check_images(tasks)
    return Benchmark(name, root, "official", tasks, summaries, folded)


def read_coco(root: Path, subsets: list[str] | None, limit: int | None, protocol: str) -> Benchmark:
    no_subsets("coco", subsets)
    return _read("coco", "dataset_coco.json", None, root, limit)


def read_flickr30k(root: Path, subsets: list[str] | None, limit: int | None, protocol: str) -> Benchmark:
    no_subsets("flickr30k", subsets)
    return _read("flickr30k", "dataset_flickr30k.json", "flickr30k-images", root, limit)
