"""Shared fixtures: a small generated corpus and a runner for the installed `retrieval` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from evaluation.shapesworld import make_shapesworld
from retrieval.text_tokenizer import OWN_IDS, TextTokenizer

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests run on the CPU unless marked `cuda`
RETRIEVAL = Path(sys.executable).with_name("retrieval")


def run_cli(*args: str | os.PathLike, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would; returns the completed process (text output)."""
    proc = subprocess.run([str(RETRIEVAL), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"retrieval {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def install_plugin(root: Path, package: str, family: str, files: dict[str, str | dict]) -> dict[str, str]:
    """Write package `package` (files: name → Python text, dedented, or a dict written as JSON) and a dist-info whose
    `retrieval.families` entry point names it as `family`, under `root`; returns the environment that finds it."""
    import json
    import textwrap

    for name, content in files.items():
        path = root / package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content) if isinstance(content, dict) else textwrap.dedent(content).lstrip())
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[retrieval.families]\n{family} = {package}\n")
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


STRACE = shutil.which("strace")
DURABILITY_CALLS = ("rename", "renameat", "renameat2", "fsync", "fdatasync")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")


def durability_calls(*args: str | os.PathLike, log: Path) -> list[tuple[str, int]]:
    """The renames and fsyncs a CLI run performs, in order, each as (syscall, its count so far): what
    `kill_at` needs to stop a run at exactly that call. All must come from the one process."""
    subprocess.run([STRACE, "-f", "-qq", "-o", str(log), "-e", "trace=" + ",".join(DURABILITY_CALLS),
                    str(RETRIEVAL), *map(str, args)], check=True, capture_output=True,
                   env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
    calls, counts, pids = [], {}, set()
    for line in log.read_text().splitlines():
        pid, _, rest = line.partition(" ")
        name = rest.strip().split("(")[0]
        if name in DURABILITY_CALLS:  # a call's entry (an `<unfinished ...>` line too; `resumed` lines are not)
            pids.add(pid)
            counts[name] = counts.get(name, 0) + 1
            calls.append((name, counts[name]))
    assert len(pids) <= 1, f"renames and fsyncs came from several processes: {pids}"
    return calls


def kill_at(call: tuple[str, int], *args: str | os.PathLike) -> subprocess.CompletedProcess:
    """Run the CLI and SIGKILL it as it makes that rename or fsync (the call does not happen)."""
    name, nth = call
    return subprocess.run([STRACE, "-f", "-qq", "-o", os.devnull, "-e", f"trace={name}",
                           "-e", f"inject={name}:signal=SIGKILL:when={nth}", str(RETRIEVAL), *map(str, args)],
                          capture_output=True, text=True, env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1"},
                          timeout=300)


@pytest.fixture(scope="session")
def shapes_corpus(tmp_path_factory) -> Path:
    """A 300-item ShapesWorld corpus (corpus.jsonl + images/), made once per test session."""
    return make_shapesworld(tmp_path_factory.mktemp("shapes"), n=300, size=32, seed=0, train_pairs=False,
                            progress=False)


@pytest.fixture(scope="session")
def shapes_store(shapes_corpus, tmp_path_factory) -> Path:
    """The corpus encoded with test-tiny into an embedding store."""
    from retrieval.encode import encode_corpus

    out = tmp_path_factory.mktemp("store") / "store"
    encode_corpus(shapes_corpus, out, "test-tiny", batch_size=64, workers=0, part_size=128, progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: one intra-op thread is fastest, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


def shape_image(colour: tuple[int, int, int], shape: str, size: int = 16) -> Image.Image:
    """A filled circle on white or a filled square on dark grey."""
    img = Image.new("RGB", (size, size), "white" if shape == "circle" else (40, 40, 40))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)([3, 3, size - 4, size - 4], fill=colour)
    return img


def write_shape_images(folder: Path) -> dict[str, str]:
    """PNG files `<colour>-<shape>` in `folder` for the four COLOURS and two shapes; name → path."""
    paths = {}
    for name, colour in COLOURS.items():
        for shape in ("square", "circle"):
            path = folder / f"{name}-{shape}.png"
            shape_image(colour, shape).save(path)
            paths[f"{name}-{shape}"] = str(path)
    return paths


TOKENIZERS = "retrieval/checkpoints/tokenizers"


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.load(TOKENIZERS, OWN_IDS)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, str]:
    """PNG files `<colour>-<shape>` for four colours and two shapes."""
    return write_shape_images(tmp_path_factory.mktemp("fdt-images"))


@pytest.fixture(scope="session")
def vector_store_20k(tmp_path_factory) -> Path:
    """A store of 20,000 synthetic embedding-like vectors (dim 64) in parts of 5,000, under test-tiny's name and
    weights, so that an index over it can be opened and searched with that model."""
    import evaluation.bench.update as update
    from evaluation.bench.index import DATABASE, synthetic_vectors
    from retrieval.encoders import load_encoder

    store = tmp_path_factory.mktemp("vectors") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(update, "PART_ROWS", 5_000)
        update.vector_store(store, synthetic_vectors(20_000, 64, 3, DATABASE),
                            encoder=load_encoder("test-tiny", device="cpu").describe())
    return store
