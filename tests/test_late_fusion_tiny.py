"""The bundled late-fusion models, `sparc-tiny` and `fdt-tiny`: they load offline from the repository, are
small, and score far above chance in `retrieval eval` in both fusion modes (through the real CLI)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evaluation.shapesworld import make_shapesworld
from retrieval.encoders.registry import default_checkpoint, get_config, load_encoder
from tests.conftest import run_cli

MODELS = ("sparc-tiny", "fdt-tiny")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """ShapesWorld at the size the tiny models were trained on (64 px), without training pairs."""
    root = tmp_path_factory.mktemp("shapes64")
    make_shapesworld(root, n=200, size=64, seed=0, train_pairs=False, progress=False)
    return root


@pytest.mark.parametrize("name", MODELS)
def test_bundled_checkpoint_is_complete_and_small(name):
    folder = default_checkpoint(get_config(name))
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20
    encoder = load_encoder(name, device="cpu")
    assert encoder.fusion == "late" and encoder.fusion_modes == ("score", "head")
    vectors = encoder.encode(texts=["a red circle", "rotate 90 degrees clockwise"])
    assert vectors.shape == (2, encoder.dim)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow
def test_eval_is_far_above_chance_in_both_fusion_modes(name, shapes, tmp_path):
    """tgit, vqa and t2i beat chance by more than 3 binomial standard errors of a chance-level model in each
    fusion mode: a broken preprocessing, loading or fusion path falls to chance."""
    run_cli("eval", "tgit,vqa,t2i", "--model", name, "--data", shapes, "--json", tmp_path / "eval.json",
            "--device", "cpu")
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert {r["fusion"] for r in rows} == {"score", "head"}
    for row in rows:
        score, chance, n = row["metrics"][row["primary"]], row["chance"], row["queries"]
        assert score > chance + 3 * math.sqrt(chance * (1 - chance) / n), (row["fusion"], row["task"], score)
