"""Small fixtures in the exact published layouts of the benchmarks `retrieval eval BENCH` reads, and `probe`, a
plugin family whose encoders read a code planted in each input: `probe-oracle` embeds code c as the c-th unit
vector (so items that share a code match exactly), `probe-constant` embeds everything the same.

A code is "#c" in a text (the first one), else the red value of an image's top-left pixel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import install_plugin
from PIL import Image

PLUGIN = {
    "__init__.py": '''
        """probe: encoders that read a code planted in their inputs, for benchmark tests."""
        import re

        import torch
        from torch import nn

        from retrieval.encoders.base import Encoder

        CODE = re.compile(r"#(\\d+)")
        DIM = 256


        class ProbeModel(nn.Module):
            def __init__(self, constant):
                super().__init__()
                self.register_buffer("constant", torch.tensor(float(constant)))

            def forward(self, code):
                onehot = nn.functional.one_hot(code, DIM).float()
                return onehot + self.constant * (1 - onehot)  # constant 1: every vector the same


        class ProbeEncoder(Encoder):
            @classmethod
            def build_model(cls, config):
                return ProbeModel(config.model["constant"])

            def prepare(self, image, text):
                found = CODE.search(text or "")
                if found:
                    code = int(found.group(1))
                elif image is not None:
                    code = image.convert("RGB").getpixel((0, 0))[0]
                else:
                    code = DIM - 1
                return {"code": torch.tensor(code % DIM)}
    ''',
    "family.json": {"family": "probe", "description": "codes planted in the inputs", "encoder": "probe:ProbeEncoder"},
    "configs/probe-oracle.json": {"name": "probe-oracle", "family": "probe", "dim": 256, "model": {"constant": 0}},
    "configs/probe-constant.json": {"name": "probe-constant", "family": "probe", "dim": 256,
                                    "model": {"constant": 1}},
}


def write_probe_plugin(root: Path) -> dict[str, str]:
    """The `probe` package and its dist-info under `root`; the environment in which the CLI finds it."""
    return install_plugin(root, "probe", "probe", PLUGIN)


def image(path: Path, code: int) -> None:
    """A small image whose code is `code` (its red channel; green and blue vary so files differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (code, (code * 7) % 256, 90)).save(path, format="PNG")  # lossless: the code survives


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


# ---------------------------------------------------------------------------------------------- MMEB-eval

MMEB_INSTRUCTION = "<|image_1|>\nRepresent the given image with the following question: "


def write_mmeb(root: Path, subsets: dict[str, list[dict]]) -> Path:
    """MMEB-eval: <Subset>/test-00000-of-00001.parquet with its four columns (lists of strings for the
    targets), images under eval_images/. Each row: query code, query text (or None), target codes (the first
    the positive), and whether targets are texts ("#c label") or images."""
    schema = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()),
                        ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])
    for subset, rows in subsets.items():
        records = []
        for n, row in enumerate(rows):
            qpath = f"{subset}/q{n}.jpg"
            image(root / "eval_images" / qpath, row["query"])
            if row.get("text_targets", True):
                texts = [f"#{c} {row.get('label', 'thing')}" for c in row["targets"]]
                paths = [""] * len(texts)
            else:
                texts = ["<|image_1|>\nRepresent the given image.\n"] * len(row["targets"])
                paths = [f"{subset}/t{c}.jpg" for c in row["targets"]]
                for c, p in zip(row["targets"], paths):
                    image(root / "eval_images" / p, c)
            records.append({"qry_text": row.get("qry_text", "<|image_1|>\nRepresent the given image for "
                                                             "classification\n"),
                            "qry_img_path": qpath, "tgt_text": texts, "tgt_img_path": paths})
        (root / subset).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records, schema=schema), root / subset / "test-00000-of-00001.parquet")
    return root


# ---------------------------------------------------------------------------------------------- CIRR

def write_cirr(root: Path, pairs: list[dict], gallery: dict[str, int]) -> Path:
    """CIRR release layout: captions/cap.rc2.val.json, image_splits/split.rc2.val.json, dev/<name>.png.
    `gallery` maps image names to codes; each pair has reference, target_hard, caption and members (six)."""
    write_json(root / "image_splits" / "split.rc2.val.json", {name: f"./dev/{name}.png" for name in gallery})
    for name, code in gallery.items():
        image(root / "dev" / f"{name}.png", code)
    write_json(root / "captions" / "cap.rc2.val.json", [
        {"pairid": 12000 + n, "reference": p["reference"], "target_hard": p["target_hard"],
         "target_soft": {p["target_hard"]: 1.0}, "caption": p["caption"],
         "img_set": {"id": n, "members": p["members"], "reference_rank": 0, "target_rank": 1}}
        for n, p in enumerate(pairs)])
    return root


# ---------------------------------------------------------------------------------------------- FashionIQ

def write_fashioniq(root: Path, categories: dict[str, tuple[dict[str, int], list[dict]]]) -> Path:
    """FashionIQ: captions/cap.<cat>.val.json, image_splits/split.<cat>.val.json, images/<asin>.jpg."""
    for category, (gallery, queries) in categories.items():
        write_json(root / "image_splits" / f"split.{category}.val.json", list(gallery))
        for name, code in gallery.items():
            image(root / "images" / f"{name}.jpg", code)
        write_json(root / "captions" / f"cap.{category}.val.json", queries)
    return root


# ---------------------------------------------------------------------------------------------- COCO / Flickr30k

def write_karpathy(root: Path, name: str, codes: list[int], captions_of=None, extra_splits: bool = True) -> Path:
    """dataset_coco.json (val2014/ images) or dataset_flickr30k.json (flickr30k-images/), test images with the
    given codes and five captions each ("#code …" unless `captions_of(n, code)` says otherwise)."""
    entries = []
    for n, code in enumerate(codes):
        filename = f"COCO_val2014_{n:012d}.jpg" if name == "coco" else f"{1000092795 + n}.jpg"
        folder = root / ("val2014" if name == "coco" else "flickr30k-images")
        image(folder / filename, code)
        texts = captions_of(n, code) if captions_of else [f"#{code} a picture, caption {j}" for j in range(5)]
        entry = {"filename": filename, "imgid": n, "split": "test", "sentids": list(range(5 * n, 5 * n + 5)),
                 "sentences": [{"tokens": t.lower().split(), "raw": t, "imgid": n, "sentid": 5 * n + j}
                               for j, t in enumerate(texts)]}
        if name == "coco":
            entry |= {"filepath": "val2014", "cocoid": 391895 + n}
        entries.append(entry)
    if extra_splits:  # train and val images are in the file too, and must be left out
        entries.append({"filename": "train.jpg", "filepath": "train2014", "imgid": len(codes), "split": "train",
                        "sentids": [], "sentences": [{"raw": "#1 not a test caption", "tokens": []}] * 5})
    write_json(root / f"dataset_{name}.json", {"images": entries, "dataset": name})
    return root


# ---------------------------------------------------------------------------------------------- image folder

def write_imagefolder(root: Path, classes: dict[str, int], per_class: int = 3) -> Path:
    """<class>/<n>.jpg for each class code, and classnames.txt naming each class "#code name"."""
    for folder, code in classes.items():
        for n in range(per_class):
            image(root / folder / f"{n}.jpg", code)
    (root / "classnames.txt").write_text("".join(f"#{code} {folder}\n" for folder, code in sorted(classes.items())))
    return root
