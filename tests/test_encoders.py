"""The encoder interface, the registry and our checkpoint format, on the registered test-tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import retrieval
from retrieval import RetrievalError
from retrieval.encoders import list_configs, load_encoder


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)) for i in range(n)]


def test_registry_lists_test_models_with_dims():
    configs = list_configs()
    assert configs["test-tiny"].dim == 64 and configs["test-tiny-128"].dim == 128
    assert list(configs) == sorted(configs)
    with pytest.raises(RetrievalError, match="unknown model 'nope'.*test-tiny"):
        load_encoder("nope")


def test_encoder_attributes_and_unit_vectors():
    enc = retrieval.load_encoder("test-tiny", device="cpu")
    assert (enc.name, enc.dim, enc.fusion) == ("test-tiny", 64, "early")
    images, texts = _images(3), ["a red circle", "a blue square", "rotate 90 degrees clockwise"]
    for kwargs in ({"images": images}, {"texts": texts}, {"images": images, "texts": texts}):
        vectors = enc.encode(**kwargs)
        assert vectors.shape == (3, 64) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # image-only, text-only and both are three different embeddings of related inputs
    both, image_only, text_only = (enc.encode(images=images[:1], texts=texts[:1]), enc.encode(images=images[:1]),
                                   enc.encode(texts=texts[:1]))
    assert not np.allclose(both, image_only) and not np.allclose(both, text_only)


def test_same_seed_same_weights_and_batch_independence():
    a, b = load_encoder("test-tiny", device="cpu"), load_encoder("test-tiny", device="cpu")
    assert a.weights_sha256 == b.weights_sha256
    assert a.weights_sha256 != load_encoder("test-tiny-128", device="cpu").weights_sha256
    texts = [f"item number {i}" for i in range(10)]
    together = a.encode(texts=texts, batch_size=4)
    one_by_one = np.concatenate([b.encode(texts=[t]) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in together}) == len(texts)  # distinct inputs, distinct vectors


def test_prepare_collate_embed_is_encode():
    enc = load_encoder("test-tiny", device="cpu")
    images, texts = _images(2), ["first", None]
    batch = enc.collate([enc.prepare(img, txt) for img, txt in zip(images, texts)])
    np.testing.assert_allclose(enc.embed(batch).numpy(), enc.encode(images=images, texts=texts), atol=1e-6)


def test_encode_takes_image_paths(tmp_path):
    enc = load_encoder("test-tiny", device="cpu")
    img = _images(1)[0]
    img.save(tmp_path / "x.png")
    np.testing.assert_allclose(enc.encode(images=[tmp_path / "x.png"]), enc.encode(images=[img]), atol=1e-6)
    with pytest.raises(RetrievalError, match="image not found"):
        enc.encode(images=[tmp_path / "missing.png"])
    with pytest.raises(RetrievalError, match="2 images but 1 texts"):
        enc.encode(images=[img, img], texts=["one"])


def test_checkpoint_round_trip_and_strict_loading(tmp_path):
    enc = load_encoder("test-tiny", device="cpu")
    ckpt = enc.save(tmp_path / "ckpt")
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    # change the weights so the checkpoint differs from the seeded initialisation
    with torch.no_grad():
        enc.model.fuse[2].weight.mul_(-1)
    enc._weights_sha256 = None
    enc.save(ckpt)
    loaded = load_encoder(str(ckpt), device="cpu")
    assert loaded.weights_sha256 == enc.weights_sha256 != load_encoder("test-tiny", device="cpu").weights_sha256
    np.testing.assert_allclose(loaded.encode(texts=["abc"]), enc.encode(texts=["abc"]), atol=1e-6)

    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    state["unexpected.weight"] = torch.zeros(1)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(RetrievalError, match="unexpected keys"):
        load_encoder(str(ckpt), device="cpu")
    with pytest.raises(RetrievalError, match="no config.json"):
        load_encoder(str(tmp_path), device="cpu")


def test_cuda_requested_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RetrievalError, match="no CUDA GPU"):
        load_encoder("test-tiny", device="cuda")
