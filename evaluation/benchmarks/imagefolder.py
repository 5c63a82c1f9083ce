"""Zero-shot classification on a folder of class subfolders (torchvision's ImageFolder layout):

    DATA/<class>/<image>.jpg …   classes in sorted folder-name order
    DATA/classnames.txt          optional: one readable name per line, in that order (else the folder names, or
                                 open_clip's ImageNet names for the 1,000 ImageNet WordNet-id folders)
    DATA/templates.txt           optional: one prompt per line with {} for the name (else OpenAI's 80)

Each class is the normalised mean of its prompts' normalised text embeddings (open_clip
zero_shot_classifier.build_zero_shot_classifier); each image ranks the classes; top-1 and top-5 accuracy.
A folder of exactly the 1,000 ImageNet WordNet-id folders is reported as `imagenet`, next to the papers'
ImageNet figures.
"""

from __future__ import annotations

import re
from pathlib import Path

from evaluation.benchmarks.layout import Benchmark, Layout, limited, no_subsets
from evaluation.tasks import Item, Query, Task
from retrieval.files import read_json
from retrieval.images import IMAGE_SUFFIXES

IMAGENET = Path(__file__).with_name("imagenet.json")  # open_clip's prompts and ImageNet class names
WORDNET_ID = re.compile(r"n\d{8}")
KS = (1, 5)


def _lines(layout: Layout, name: str) -> list[str] | None:
    path = layout.root / name
    if not path.is_file():
        return None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError:
        raise layout.refuse(f"{name} is not UTF-8 text") from None
    return [line for line in lines if line]


def read_imagefolder(root: Path, subsets: list[str] | None, limit: int | None, protocol: str) -> Benchmark:
    no_subsets("imagefolder", subsets)
    layout = Layout("imagefolder", root, "one subfolder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise layout.refuse(f"{len(classes)} class subfolders; zero-shot needs at least two")
    unreadable = [c for c in classes if not c.isprintable()]  # undecodable bytes come as surrogates, unprintable
    if unreadable:
        raise layout.refuse(f"class folder {unreadable[0]!r} has a name that is not UTF-8 text")
    builtin = read_json(IMAGENET)
    imagenet = len(classes) == 1000 and all(WORDNET_ID.fullmatch(c) for c in classes)
    names = _lines(layout, "classnames.txt") or (builtin["classnames"] if imagenet
                                                  else [c.replace("_", " ") for c in classes])
    if len(names) != len(classes):
        raise layout.refuse(f"classnames.txt has {len(names)} names for {len(classes)} class folders")
    templates = _lines(layout, "templates.txt") or builtin["templates"]
    if not all("{}" in t for t in templates):
        raise layout.refuse("every line of templates.txt needs {} where the class name goes")
    queries = []
    for folder in classes:
        files = sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise layout.refuse(f"class folder {folder}/ holds no images")
        queries += [Query(Item(f"{folder}/{p.name}", layout.image(f"{folder}/{p.name}", folder)), (folder,))
                    for p in files]
    imagenet = len(classes) == 1000 and all(WORDNET_ID.fullmatch(c) for c in classes)
    name = "imagenet" if imagenet else "imagefolder"
    candidates = [Item(folder, text=label) for folder, label in zip(classes, names)]
    ensembles = {c.id: [Item(f"{c.id}#{i}", text=t.replace("{}", c.text or "")) for i, t in enumerate(templates)]
                 for c in candidates}
    task = Task("zeroshot", name, "pool", "hit@1", "zero-shot classification: top-1 / top-5 accuracy",
                limited(queries, limit), candidates, extra={"ks": list(KS)})
    return Benchmark(name, root, protocol, [task], ensembles=ensembles)
