"""FDT's official checkpoint importer: a random checkpoint in the official layout, imported with
`retrieval models import fdt`, gives the official keys and tensors and computes the official forward (checked
against a forward written by hand from the reference); broken checkpoints are refused with the problem named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from test_fdt import CODEBOOK, CTX, TOKENIZERS, cli_in_process, simplex_projection, tiny_encoder
from test_fuselip import _gelu, _ln
from test_fuselip_import import write_clip_bpe

from retrieval.encoders.fdt.model import FDT
from retrieval.encoders.registry import load_encoder
from retrieval.text_tokenizer import OWN_IDS, TextTokenizer


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.load(TOKENIZERS, OWN_IDS)


V_W, V_LAYERS, PATCH, IMAGE = 64, 2, 32, 64
T_W, T_LAYERS, OFF_CTX = 64, 2, 16
OFF_C, OFF_D = 64, 32
FDT_VOCAB = 49409
SOT, EOT, MASK = 49407, 49408, 49406
UNTRAINED_KEYS = ("visual.ln_post.weight", "visual.ln_post.bias", "visual.proj", "encode_text.text_projection.weight",
                  "encode_text.text_projection.bias", "logit_scale_sd")


def official_shapes(vision_width: int, vision_layers: int, patch: int, image: int, text_width: int,
                    text_layers: int, context: int, codebook: int, dim: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """The official FDT state-dict keys (without `module.`) and shapes of reference §5."""
    shapes: dict[str, tuple[int, ...]] = {"space_dict": (codebook, dim), "logit_scale": (1,), "logit_scale_sd": (1,)}

    def block(prefix: str, w: int) -> None:
        shapes.update({
            prefix + "attn.in_proj_weight": (3 * w, w), prefix + "attn.in_proj_bias": (3 * w,),
            prefix + "attn.out_proj.weight": (w, w), prefix + "attn.out_proj.bias": (w,),
            prefix + "ln_1.weight": (w,), prefix + "ln_1.bias": (w,),
            prefix + "mlp.c_fc.weight": (4 * w, w), prefix + "mlp.c_fc.bias": (4 * w,),
            prefix + "mlp.c_proj.weight": (w, 4 * w), prefix + "mlp.c_proj.bias": (w,),
            prefix + "ln_2.weight": (w,), prefix + "ln_2.bias": (w,),
        })

    v = vision_width
    shapes.update({"visual.conv1.weight": (v, 3, patch, patch), "visual.class_embedding": (v,),
                   "visual.positional_embedding": ((image // patch) ** 2 + 1, v),
                   "visual.ln_pre.weight": (v,), "visual.ln_pre.bias": (v,)})
    for i in range(vision_layers):
        block(f"visual.transformer.resblocks.{i}.", v)
    shapes.update({"visual.ln_post.weight": (v,), "visual.ln_post.bias": (v,), "visual.proj": (v, dim)})
    t = text_width
    shapes.update({"encode_text.token_embedding.weight": (vocab, t), "encode_text.positional_embedding": (context, t)})
    for i in range(text_layers):
        block(f"encode_text.transformer.resblocks.{i}.", t)
    shapes.update({"encode_text.ln_final.weight": (t,), "encode_text.ln_final.bias": (t,),
                   "encode_text.text_projection.weight": (dim, t), "encode_text.text_projection.bias": (dim,)})
    for side, width in (("img", v), ("txt", t)):
        q = f"{side}_query_model.q_map."
        shapes.update({q + "0.weight": (width,), q + "0.bias": (width,), q + "1.weight": (dim, width),
                       q + "1.bias": (dim,), q + "3.weight": (dim,), q + "3.bias": (dim,), q + "4.weight": (dim, dim),
                       q + "4.bias": (dim,)})
    return shapes


def test_official_key_table_matches_the_reference_counts():
    """§5: the released ViT-B/32 model has 321 tensors, 160.85 M parameters, 8.39 M of them the codebook."""
    shapes = official_shapes(768, 12, 32, 224, 512, 12, 77, 16384, 512, FDT_VOCAB)
    assert len(shapes) == 321
    assert round(sum(math.prod(s) for s in shapes.values()) / 1e6, 2) == 160.85
    assert round(math.prod(shapes["space_dict"]) / 1e6, 2) == 8.39
    assert shapes["visual.positional_embedding"] == (50, 768) and shapes["visual.proj"] == (768, 512)


def random_official_state(seed: int = 0, dim: int = OFF_D) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = official_shapes(V_W, V_LAYERS, PATCH, IMAGE, T_W, T_LAYERS, OFF_CTX, OFF_C, dim, FDT_VOCAB)
    state = {}
    for key, shape in shapes.items():
        if key in ("logit_scale", "logit_scale_sd"):
            state[key] = torch.tensor([math.log(1 / 0.07)])
        elif key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight",
                           "q_map.0.weight", "q_map.3.weight")):
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif key.endswith("bias"):
            state[key] = 0.1 * torch.randn(shape, generator=gen)
        elif key == "space_dict":
            state[key] = torch.randn(shape, generator=gen)
        elif len(shape) >= 2 and "embedding" not in key:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        else:  # token, positional and class embeddings
            state[key] = 0.5 * torch.randn(shape, generator=gen)
    assert all(tuple(state[k].shape) == shapes[k] for k in shapes)
    return state


def save_official(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "optimizer": {}, "last_iter": 3}, path)
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A random official-layout checkpoint beside a tiny CLIP BPE, imported with `retrieval models import`."""
    folder = tmp_path_factory.mktemp("official")
    state = random_official_state()
    path = save_official(state, folder / "ckpt_3.pth.tar")
    vocab = write_clip_bpe(folder)
    out = tmp_path_factory.mktemp("imported") / "fdt"
    proc = run_cli("models", "import", "fdt", path, "--out", out, "--option", "temperature=1000")
    assert str(out) in proc.stdout
    return {"folder": folder, "path": path, "out": out, "state": state, "vocab": vocab}


def test_import_config_ids_and_tensors(official):
    from safetensors.torch import load_file

    out, state, vocab = official["out"], official["state"], official["vocab"]
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "fdt" and config["dim"] == OFF_D
    assert (config["image_size"], config["context_length"]) == (IMAGE, OFF_CTX)
    assert tuple(config["mean"]) == (0.485, 0.456, 0.406) and tuple(config["std"]) == (0.229, 0.224, 0.225)
    model = config["model"]
    expected = {"dim": OFF_D, "codebook_size": OFF_C, "temperature": 1000.0, "patch": PATCH, "vision_width": V_W,
                "vision_layers": V_LAYERS, "vision_heads": 1, "text_vocab": FDT_VOCAB, "text_width": T_W,
                "text_layers": T_LAYERS, "text_heads": 1, "pad_mask": "zero", "text_causal": True,
                "fusion_head": None}
    assert {k: model[k] for k in expected} == expected
    assert model["special_ids"] == {"sot": SOT, "eot": EOT, "pad": 0, "mask": MASK}

    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(state) - set(UNTRAINED_KEYS)
    for key, tensor in saved.items():
        assert torch.equal(tensor.reshape(state[key].shape), state[key]), key

    enc = load_encoder(out, device="cpu")
    assert enc.tokenizer.vocab_size == FDT_VOCAB
    assert enc.tokenizer.row("red cat", 8) == [SOT, vocab["red</w>"], vocab["cat</w>"], EOT, 0, 0, 0, 0]
    assert enc.model.config.temperature == 1000.0


def test_import_save_load_round_trip(official, tmp_path):
    enc = load_encoder(official["out"], device="cpu")
    again = load_encoder(enc.save(tmp_path / "again"), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8))
    texts = ["red cat", "the dog on the cat", ""]
    assert np.array_equal(enc.encode(texts=texts), again.encode(texts=texts))
    assert np.array_equal(enc.encode(images=[image]), again.encode(images=[image]))
    both = {"images": [image], "texts": ["red dog"]}
    assert np.array_equal(enc.encode(**both), again.encode(**both))
    assert torch.equal(enc.codes(texts=texts), again.codes(texts=texts))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _block_by_hand(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, heads: int, causal: bool,
                   act) -> torch.Tensor:
    """One CLIP residual block on x [L, W]: x + attn(ln_1(x)), then x + c_proj(act(c_fc(ln_2(x))))."""
    length, width = x.shape
    h = _ln(x, sd[prefix + "ln_1.weight"], sd[prefix + "ln_1.bias"])
    q, k, v = (h @ sd[prefix + "attn.in_proj_weight"].T + sd[prefix + "attn.in_proj_bias"]).split(width, -1)
    size = width // heads
    out = torch.zeros_like(x)
    for head in range(heads):
        cols = slice(head * size, (head + 1) * size)
        logits = q[:, cols] @ k[:, cols].T / math.sqrt(size)
        if causal:
            logits = logits.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
        out[:, cols] = logits.softmax(-1) @ v[:, cols]
    x = x + out @ sd[prefix + "attn.out_proj.weight"].T + sd[prefix + "attn.out_proj.bias"]
    h = _ln(x, sd[prefix + "ln_2.weight"], sd[prefix + "ln_2.bias"])
    h = act(h @ sd[prefix + "mlp.c_fc.weight"].T + sd[prefix + "mlp.c_fc.bias"])
    return x + h @ sd[prefix + "mlp.c_proj.weight"].T + sd[prefix + "mlp.c_proj.bias"]


def _fdt_by_hand(features: torch.Tensor, sd: dict[str, torch.Tensor], side: str, real: torch.Tensor | None,
                 temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """q_map → codebook / √d → padded scores set to 0 → / T → max over positions → sparsemax; (Eᵀw, w)."""
    q = f"{side}_query_model.q_map."
    x = _ln(features, sd[q + "0.weight"], sd[q + "0.bias"])
    x = _gelu(x @ sd[q + "1.weight"].T + sd[q + "1.bias"])  # the query map's GELU is nn.GELU
    x = _ln(x, sd[q + "3.weight"], sd[q + "3.bias"])
    x = x @ sd[q + "4.weight"].T + sd[q + "4.bias"]
    scores = x @ sd["space_dict"].T / math.sqrt(sd["space_dict"].shape[1])
    if real is not None:
        scores = scores * real[:, None].double()
    w = simplex_projection((scores / temperature).amax(0).numpy())
    return w @ sd["space_dict"].numpy(), w


def official_text_by_hand(sd: dict[str, torch.Tensor], ids: list[int], temperature: float, act):
    x = sd["encode_text.token_embedding.weight"][ids] + sd["encode_text.positional_embedding"][: len(ids)]
    for i in range(T_LAYERS):
        x = _block_by_hand(x, sd, f"encode_text.transformer.resblocks.{i}.", T_W // 64, True, act)
    x = _ln(x, sd["encode_text.ln_final.weight"], sd["encode_text.ln_final.bias"])
    first_eot = ids.index(EOT)
    real = torch.tensor([j <= first_eot for j in range(len(ids))])
    return _fdt_by_hand(x, sd, "txt", real, temperature)


def official_image_by_hand(sd: dict[str, torch.Tensor], pixels: torch.Tensor, temperature: float, act):
    """pixels [3, H, W] → conv1 as a matmul over row-major patches → CLS + positions → ln_pre → blocks → patch
    outputs before ln_post, CLS dropped."""
    grid = pixels.shape[-1] // PATCH
    patches = pixels.reshape(3, grid, PATCH, grid, PATCH).permute(1, 3, 0, 2, 4).reshape(grid * grid, -1)
    x = patches @ sd["visual.conv1.weight"].reshape(V_W, -1).T
    x = torch.cat([sd["visual.class_embedding"][None], x]) + sd["visual.positional_embedding"]
    x = _ln(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(V_LAYERS):
        x = _block_by_hand(x, sd, f"visual.transformer.resblocks.{i}.", V_W // 64, False, act)
    return _fdt_by_hand(x[1:], sd, "img", None, temperature)


def _compare_with_official_forward(official, act) -> None:
    sd = {k: v.double() for k, v in official["state"].items()}
    enc = load_encoder(official["out"], device="cpu")
    ids = enc.tokenizer.row("the red cat on the dog", OFF_CTX)
    assert ids[0] == SOT and ids.index(EOT) == 7 and ids[8:] == [0] * 8
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    # the imported T = 1000 (every code nearly uniform, so tight tolerances), and T = 10 (sparse codes)
    for temperature, atol in ((1000.0, 2e-6), (10.0, 2e-5)):
        enc.model.config.temperature = temperature
        with torch.no_grad():
            text_emb, text_code = enc.model.text_outputs(torch.tensor([ids]))
            image_emb, image_code = enc.model.image_outputs(pixels)
        want_text_emb, want_text_code = official_text_by_hand(sd, ids, temperature, act)
        want_image_emb, want_image_code = official_image_by_hand(sd, pixels[0].double(), temperature, act)
        if temperature == 10.0:
            assert 1 < (want_text_code > 0).sum() < OFF_C // 2 and 1 < (want_image_code > 0).sum() < OFF_C // 2
        np.testing.assert_allclose(text_code[0].numpy(), want_text_code, atol=atol)
        np.testing.assert_allclose(text_emb[0].numpy(), want_text_emb, atol=atol)
        np.testing.assert_allclose(image_code[0].numpy(), want_image_code, atol=atol)
        np.testing.assert_allclose(image_emb[0].numpy(), want_image_emb, atol=atol)


def test_imported_model_computes_the_official_forward(official):
    """The hand computation from the raw official tensors: causal text tower and ViT patches before ln_post with
    QuickGELU blocks (the official CLIP blocks), q_map, codebook / √d, zero padding, / T, max, sparsemax, Eᵀw."""
    _compare_with_official_forward(official, _quick_gelu)


def test_the_exact_gelu_would_not_match_the_official_forward(official):
    """The activation matters: with exact-GELU blocks the hand computation no longer matches the import."""
    with pytest.raises(AssertionError):
        _compare_with_official_forward(official, _gelu)


def test_imported_fdt_embeds_an_image_or_a_text_as_its_tower_alone(official):
    """Search embeddings of an imported model: an image alone is the official image embedding normalised (no
    empty text added), a text alone the official text embedding; only an image with a text is fused."""
    sd = {k: v.double() for k, v in official["state"].items()}
    enc = load_encoder(official["out"], device="cpu")
    temperature = enc.model.config.temperature
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (90, 70, 3), np.uint8))
    pixels = enc.prepare(image, None)["pixels"].double()
    want_image = official_image_by_hand(sd, pixels, temperature, _quick_gelu)[0]
    want_text = official_text_by_hand(sd, enc.tokenizer.row("a cat", OFF_CTX), temperature, _quick_gelu)[0]
    got = enc.encode(images=[image, None, image], texts=[None, "a cat", "a cat"])
    np.testing.assert_allclose(got[0], want_image / np.linalg.norm(want_image), atol=1e-5)
    np.testing.assert_allclose(got[1], want_text / np.linalg.norm(want_text), atol=1e-5)
    fused = want_image / np.linalg.norm(want_image) + want_text / np.linalg.norm(want_text)
    np.testing.assert_allclose(got[2], fused / np.linalg.norm(fused), atol=1e-5)


def _broken(state: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    if case == "missing_untrained":
        del state["visual.proj"]
    elif case == "missing_block_key":
        del state["encode_text.transformer.resblocks.1.mlp.c_proj.bias"]
    elif case == "unexpected":
        state["visual.extra_head.weight"] = torch.zeros(3)
    elif case == "shape":
        state["txt_query_model.q_map.4.weight"] = torch.zeros(OFF_D, OFF_D - 1)
    elif case == "vocab":
        state["encode_text.token_embedding.weight"] = state["encode_text.token_embedding.weight"][:49408]
    return state


# (75, 73): a crop offset of 5.5, rounded to 6; past 16:1 only the crop's box is resized, so (500, 37) stays below
@pytest.mark.parametrize("size", [(367, 256), (200, 301), (75, 73), (146, 150), (500, 37)])
def test_imported_fdt_prepares_images_as_the_official_evaluation(official, size):
    """torchvision's Resize(256) + CenterCrop(224), scaled to the model's size: the shorter side resized
    bilinearly, the longer one truncated, the crop offset rounded half to even; then ImageNet mean/std."""
    enc = load_encoder(official["out"], device="cpu")
    resize = IMAGE * 256 // 224
    assert (enc.config.resize, enc.config.interpolation) == (resize, "bilinear")
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), np.uint8))
    w, h = size
    new = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    left, top = round((new[0] - IMAGE) / 2), round((new[1] - IMAGE) / 2)
    crop = image.resize(new, Image.Resampling.BILINEAR).crop((left, top, left + IMAGE, top + IMAGE))
    expected = (np.asarray(crop, np.float32) / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
    pixels = enc.prepare(image, None)["pixels"].numpy()
    assert np.allclose(pixels, expected.transpose(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("missing_untrained", "missing keys: visual.proj"),
    ("missing_block_key", "missing keys: encode_text.transformer.resblocks.1.mlp.c_proj.bias"),
    ("unexpected", "unexpected keys: visual.extra_head.weight"),
    ("shape", "txt_query_model.q_map.4.weight (32, 31) (expected (32, 32))"),
    ("vocab", "encode_text.token_embedding has 49408 rows"),
    ("no_temperature", "give --option temperature="),
])
def test_import_refusals_name_the_problem(official, tmp_path, capsys, case, message):
    path = save_official(_broken(official["state"], case), tmp_path / "ckpt_3.pth.tar")
    write_clip_bpe(tmp_path)
    out = tmp_path / "out"
    temperature = [] if case == "no_temperature" else ["--option", "temperature=1000"]
    code, stderr = cli_in_process(capsys, "models", "import", "fdt", path, "--out", out, *temperature)
    assert code == 2 and message in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_fdt_model_is_a_dual_encoder_with_the_official_parameter_names(tok):
    """Our parameter names are the official ones (less the untrained heads), plus the fusion head."""
    model = tiny_encoder(tok).model
    assert isinstance(model, FDT)
    names = set(model.state_dict())
    official_names = set(official_shapes(32, 1, 4, 16, 32, 1, CTX, CODEBOOK, 32, 1024)) - set(UNTRAINED_KEYS)
    assert names - official_names == {n for n in names if n.startswith("fusion_head.")}
    assert official_names <= names
