"""`retrieval train tokenizer` and `retrieval train fuselip-tiny` end to end through the CLI, on a small
ShapesWorld with training pairs: the outputs load, a rerun resumes, and bad settings get one error line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from evaluation.shapesworld import make_shapesworld
from retrieval.encoders.fuselip import fuselip_config
from retrieval.encoders.registry import get_config, load_encoder
from retrieval.training.tokenizers import load_tokenizers


@pytest.mark.slow
def test_train_tokenizer_then_model_then_resume(tmp_path):
    data = tmp_path / "shapes"
    make_shapesworld(data, n=30, size=64, seed=1, train_pairs=True, progress=False)
    tokenizers = tmp_path / "tok"
    run_cli("train", "tokenizer", "--data", data, "--out", tokenizers, "--steps", "3", "--batch-size", "16",
            "--vocab-size", "300")
    text, image_state = load_tokenizers(tokenizers, fuselip_config(get_config("fuselip-tiny")).image_tokenizer)
    assert 4 < text.vocab_size <= 300 and "quantize.embedding.weight" in image_state
    assert not any(k.startswith("decoder") for k in image_state)  # the training decoder is left out

    out = tmp_path / "model"
    args = ["train", "fuselip-tiny", "--data", data, "--tokenizers", tokenizers, "--out", out, "--steps", "2",
            "--batch-size", "16", "--warmup", "1", "--device", "cpu"]
    proc = run_cli(*args)
    assert "trained fuselip-tiny for 2 steps" in proc.stdout
    history = json.loads((out / "train.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    encoder = load_encoder(out, device="cpu")
    vectors = encoder.encode(images=[str(data / "images" / "000000.png")], texts=["rotate 90 degrees clockwise"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    run_cli(*args)  # a finished run reruns as a no-op resume
    assert json.loads((out / "train.json").read_text())["history"] == history
    changed = run_cli(*args[:-2], "--device", "cpu", "--lr", "0.1", check=False)
    assert changed.returncode == 2 and "other settings" in changed.stderr
    bad = run_cli("train", "fuselip-tiny", "--data", data, "--out", tmp_path / "x", "--repeat", "nosuch=2",
                  check=False)
    assert bad.returncode == 2 and "nosuch" in bad.stderr


def test_bench_train_refuses_a_model_of_another_family(tmp_path):
    """(The README's `bench train --json` run is checked in test_readme.check_bench_train.)"""
    data = tmp_path / "shapes"
    make_shapesworld(data, n=30, size=64, seed=2, train_pairs=True, progress=False)
    other = run_cli("bench", "train", "--data", data, "--model", "sparc-tiny", "--steps", "7", check=False)
    assert other.returncode == 2 and "fuselip" in other.stderr and "sparc" in other.stderr
