"""The official FuseLIP importer (reference: /work/shared/reference/fuselip.md §5, §6) on a random state
dict with the official key names and shapes at reduced width: strict about every key, a save → load round
trip, and an official forward pass rebuilt here with plain torch ops from the raw tensors (the text tower and
the TiTok-S-128 legacy reshape); the CLIP BPE from vocab.json + merges.txt; `retrieval models import`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from test_fuselip import _gelu, _ln, pictures, sequence_of  # noqa: F401 (pictures: a fixture used here)

from retrieval import RetrievalError
from retrieval.encoders.fuselip import FuseLIPEncoder
from retrieval.encoders.registry import load_encoder
from retrieval.images import as_rgb
from retrieval.text_tokenizer import TextTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread

# ---------------------------------------------------------------- 8. the official checkpoint importer

CLIP_SOT, CLIP_EOT, CLIP_MASK, IMAGE_OFFSET = 49406, 49407, 49408, 49409
OFF_W, OFF_LAYERS, OFF_HEADS, OFF_CTX = 64, 2, 2, 180
TI_E, TI_LAYERS, TI_IMAGE, TI_PATCH, TI_TOKENS, TI_D, TI_C = 64, 1, 32, 16, 8, 12, 4096  # S-128 codebook 4096×12
TITOK = "image_tokenizer.model."
DECODER = "mask_prediction_head.decoder.weight"


def official_shapes(width: int, layers: int, vocab: int, context: int, titok_width: int, titok_layers: int,
                    grid: int, patch: int, tokens: int, code_dim: int, codebook: int) -> dict[str, tuple[int, ...]]:
    """The official FuseLIP state-dict keys and shapes of reference §5.3."""
    w, e = width, titok_width
    shapes: dict[str, tuple[int, ...]] = {
        "positional_embedding": (context, w), "logit_scale": (), "logit_bias": (), "token_embedding.weight": (vocab, w),
        "ln_final.weight": (w,), "ln_final.bias": (w,),
    }

    def block(prefix: str, w: int) -> None:
        shapes.update({
            prefix + "ln_1.weight": (w,), prefix + "ln_1.bias": (w,), prefix + "ln_2.weight": (w,),
            prefix + "ln_2.bias": (w,), prefix + "attn.in_proj_weight": (3 * w, w),
            prefix + "attn.in_proj_bias": (3 * w,),
            prefix + "attn.out_proj.weight": (w, w), prefix + "attn.out_proj.bias": (w,),
            prefix + "mlp.c_fc.weight": (4 * w, w), prefix + "mlp.c_fc.bias": (4 * w,),
            prefix + "mlp.c_proj.weight": (w, 4 * w), prefix + "mlp.c_proj.bias": (w,),
        })

    for i in range(layers):
        block(f"transformer.resblocks.{i}.", w)
    shapes.update({
        "mask_prediction_head.dense.weight": (w, w), "mask_prediction_head.dense.bias": (w,),
        "mask_prediction_head.layer_norm.weight": (w,), "mask_prediction_head.layer_norm.bias": (w,),
        "mask_prediction_head.bias": (vocab,), DECODER: (vocab, w),
        TITOK + "latent_tokens": (tokens, e), TITOK + "encoder.class_embedding": (1, e),
        TITOK + "encoder.positional_embedding": (grid * grid + 1, e),
        TITOK + "encoder.latent_token_positional_embedding": (tokens, e),
        TITOK + "encoder.patch_embed.weight": (e, 3, patch, patch), TITOK + "encoder.patch_embed.bias": (e,),
        TITOK + "encoder.ln_pre.weight": (e,), TITOK + "encoder.ln_pre.bias": (e,),
    })
    for i in range(titok_layers):
        block(f"{TITOK}encoder.transformer.{i}.", e)
    shapes.update({
        TITOK + "encoder.ln_post.weight": (e,), TITOK + "encoder.ln_post.bias": (e,),
        TITOK + "encoder.conv_out.weight": (code_dim, e, 1, 1), TITOK + "encoder.conv_out.bias": (code_dim,),
        TITOK + "quantize.embedding.weight": (codebook, code_dim),
    })
    return shapes


def test_official_key_list_matches_the_reference_counts():
    """§5.3: S has 265 keys, B 313 (the shape list used by the fixture below is the reference's)."""
    s = official_shapes(384, 12, 53505, 180, 512, 8, 16, 16, 128, 12, 4096)
    b = official_shapes(512, 12, 57601, 180, 768, 12, 16, 16, 128, 64, 8192)
    assert (len(s), len(b)) == (265, 313)
    assert s["token_embedding.weight"] == (53505, 384) and s[TITOK + "encoder.positional_embedding"] == (257, 512)


def random_official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = official_shapes(OFF_W, OFF_LAYERS, IMAGE_OFFSET + TI_C, OFF_CTX, TI_E, TI_LAYERS, TI_IMAGE // TI_PATCH,
                             TI_PATCH, TI_TOKENS, TI_D, TI_C)
    state = {}
    for key, shape in shapes.items():
        if key == DECODER:
            continue
        if key == "logit_scale":
            state[key] = torch.tensor(math.log(10.0))
        elif key == "logit_bias":
            state[key] = torch.tensor(-10.0)
        elif key.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight", "ln_pre.weight", "ln_post.weight",
                           "layer_norm.weight")):
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif key.endswith("bias"):
            state[key] = 0.05 * torch.randn(shape, generator=gen)
        elif key in ("token_embedding.weight", "positional_embedding"):
            state[key] = 0.5 * torch.randn(shape, generator=gen)
        elif len(shape) >= 2 and not key.endswith("embedding") and "latent_tokens" not in key:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        else:  # class / positional / latent embeddings and the codebook
            state[key] = torch.randn(shape, generator=gen) * (0.5 if "quantize" not in key else 1.0)
    state[DECODER] = state["token_embedding.weight"]  # tied: the same tensor, saved as a second key
    assert set(state) == set(shapes) and all(tuple(state[k].shape) == shapes[k] for k in shapes)
    return state


def official_config_json() -> dict:
    return {
        "model_name": "fuse-clip-titok",
        "text_config": {"context_length": OFF_CTX, "vocab_size": IMAGE_OFFSET + TI_C, "width": OFF_W,
                        "heads": OFF_HEADS, "layers": OFF_LAYERS, "mlp_ratio": 4.0, "ls_init_value": None,
                        "no_causal_mask": True, "pad_id": 0, "proj_bias": False, "output_tokens": False,
                        "pool_type": "eot"},
        "mask_pad": True,
        "image_tokenizer": "yucornetto/tokenizer_titok_s128_imagenet",
        "use_eoi": False,
        "context_length": OFF_CTX,
        "transformer_size": "small",
        "mlm_probability": 0.1,
        "rand_repl_probability": 0.0,
    }


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte → printable unicode table, in CLIP's order (the first 256 vocabulary entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


CLIP_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>"),
               ("o", "n</w>"), ("t", "h"), ("th", "e</w>")]


def write_clip_bpe(folder: Path) -> dict[str, int]:
    """A tiny CLIP-form BPE (bytes, bytes + </w>, a few merges, filler) of exactly 49408 entries."""
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in CLIP_MERGES]
    vocab += [f"<filler{i}>" for i in range(len(vocab), CLIP_SOT)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    ids = {token: i for i, token in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(ids), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES),
                                       encoding="utf-8")
    return ids


def expected_clip_pieces(vocab: dict[str, int]) -> list[int]:
    """"A red cat on the dog!" in CLIP BPE: lower-cased words, each ending in </w>."""
    return [vocab[t] for t in ("a</w>", "red</w>", "cat</w>", "on</w>", "the</w>", "dog</w>", "!</w>")]


CLIP_TEXT = "A red cat on the dog!"


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official-layout checkpoint folder (with the CLIP BPE files) and its import."""
    from retrieval.encoders.fuselip.official import import_fuselip

    folder = tmp_path_factory.mktemp("official")
    state = random_official_state()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(official_config_json()), encoding="utf-8")
    vocab = write_clip_bpe(folder)
    out = tmp_path_factory.mktemp("imported") / "fuselip"
    path = import_fuselip(folder, out, tokenizer=folder)
    return {"folder": folder, "out": path, "state": state, "vocab": vocab}


def test_clip_files_tokenizer(tmp_path):
    vocab = write_clip_bpe(tmp_path)
    tok = TextTokenizer.from_clip_files(tmp_path)
    assert (tok.ids.sot, tok.ids.eot, tok.ids.pad, tok.ids.mask) == (49406, 49407, 0, 49408)
    assert tok.vocab_size == 49409
    assert tok.pieces(CLIP_TEXT) == expected_clip_pieces(vocab)
    assert tok.row("red cat", 6) == [49406, vocab["red</w>"], vocab["cat</w>"], 49407, 0, 0]
    no_mask = TextTokenizer.from_clip_files(tmp_path, mask=False)
    assert no_mask.ids.mask is None and no_mask.vocab_size == 49408


def test_clip_vocabulary_fixture_is_clip_like(tmp_path):
    vocab = write_clip_bpe(tmp_path)
    assert vocab["a</w>"] == 320 and vocab["!</w>"] == 256 and vocab["!"] == 0  # as in OpenAI's CLIP vocabulary


def test_import_gives_the_official_layout(official):
    enc = load_encoder(official["out"], device="cpu")
    assert isinstance(enc, FuseLIPEncoder)
    cfg = enc.model.config
    assert (cfg.width, cfg.heads, cfg.layers, cfg.context_length) == (OFF_W, OFF_HEADS, OFF_LAYERS, OFF_CTX)
    assert (cfg.text_vocab, cfg.image_offset, cfg.vocab_size) == (49409, IMAGE_OFFSET, IMAGE_OFFSET + TI_C)
    assert (cfg.special_ids.sot, cfg.special_ids.eot, cfg.special_ids.pad, cfg.special_ids.mask) == (
        CLIP_SOT, CLIP_EOT, 0, CLIP_MASK)
    ti = cfg.image_tokenizer
    assert (ti.l2_norm, ti.legacy, ti.codebook_size, ti.code_dim, ti.num_tokens, ti.image_size) == (
        True, True, TI_C, TI_D, TI_TOKENS, TI_IMAGE)
    assert enc.dim == OFF_W and enc.config.image_size == TI_IMAGE
    # every official tensor arrived unchanged (conv_out as a Linear, the tied decoder dropped)
    ours = enc.model.state_dict()
    for key, tensor in official["state"].items():
        if key == DECODER:
            continue
        mine = ours["image_tokenizer." + key.removeprefix(TITOK) if key.startswith(TITOK) else key]
        assert torch.equal(mine.reshape(tensor.shape), tensor), key
    vectors = enc.encode(images=[pictures(1, size=(40, 30))[0], None], texts=["", CLIP_TEXT])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert enc.tokenizer.pieces(CLIP_TEXT) == expected_clip_pieces(official["vocab"])


def test_import_save_load_round_trip_is_identical(official, tmp_path):
    first = load_encoder(official["out"], device="cpu")
    first.save(tmp_path / "again")
    second = load_encoder(tmp_path / "again", device="cpu")
    images, texts = [pictures(1, size=(40, 30))[0], None, pictures(2)[1]], ["", CLIP_TEXT, "the red dog"]
    np.testing.assert_array_equal(first.encode(images=images, texts=texts), second.encode(images=images, texts=texts))
    assert first.weights_sha256 == second.weights_sha256


# ---- the official forward pass, rebuilt with plain torch ops from the raw official tensors (float64)


def _block(sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, heads: int,
           pad: torch.Tensor | None = None) -> torch.Tensor:
    """One OpenAI-CLIP residual block on one sequence x [L, W]; `pad` [L] marks keys nobody attends to."""
    n, w = x.shape
    hd = w // heads
    h = _ln(x, sd[prefix + "ln_1.weight"], sd[prefix + "ln_1.bias"])
    in_w, in_b = sd[prefix + "attn.in_proj_weight"], sd[prefix + "attn.in_proj_bias"]
    q, k, v = (h @ in_w[i * w:(i + 1) * w].T + in_b[i * w:(i + 1) * w] for i in range(3))  # rows: q, k, v
    heads_out = []
    for j in range(heads):
        cols = slice(j * hd, (j + 1) * hd)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(hd)
        if pad is not None:
            scores = scores.masked_fill(pad[None, :], float("-inf"))
        heads_out.append(torch.softmax(scores, dim=-1) @ v[:, cols])
    x = x + torch.cat(heads_out, dim=1) @ sd[prefix + "attn.out_proj.weight"].T + sd[prefix + "attn.out_proj.bias"]
    h = _ln(x, sd[prefix + "ln_2.weight"], sd[prefix + "ln_2.bias"])
    h = _gelu(h @ sd[prefix + "mlp.c_fc.weight"].T + sd[prefix + "mlp.c_fc.bias"])
    return x + h @ sd[prefix + "mlp.c_proj.weight"].T + sd[prefix + "mlp.c_proj.bias"]


def official_embedding(sd: dict[str, torch.Tensor], ids: list[int], heads: int = OFF_HEADS) -> torch.Tensor:
    """§1.6: ids padded with 0 to 180, key-padding mask, ln_final, first EOT, no projection, L2-normalised."""
    sd = {k: v.double() for k, v in sd.items()}
    ids_t = torch.tensor(ids + [0] * (OFF_CTX - len(ids)))
    x = sd["token_embedding.weight"][ids_t] + sd["positional_embedding"][:OFF_CTX]
    for i in range(OFF_LAYERS):
        x = _block(sd, f"transformer.resblocks.{i}.", x, heads, pad=ids_t == 0)
    x = _ln(x, sd["ln_final.weight"], sd["ln_final.bias"])
    pooled = x[ids.index(CLIP_EOT)]
    return pooled / pooled.norm()


def official_pixels(img: Image.Image) -> torch.Tensor:
    """§1.7: squash to size×size (torchvision's Resize((S, S)) on a PIL image: PIL's bicubic resize), then
    convert("RGB"), [0, 1], no mean/std."""
    arr = np.asarray(img.resize((TI_IMAGE, TI_IMAGE), Image.Resampling.BICUBIC).convert("RGB"), np.float64) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)


def official_titok_codes(sd: dict[str, torch.Tensor], pixels: torch.Tensor, legacy: bool = True) -> list[int]:
    """TiTok encoder + VQ on one image [3, S, S], as the official code does it (S-128: legacy, l2-normalised)."""
    sd = {k.removeprefix(TITOK): v.double() for k, v in sd.items() if k.startswith(TITOK)}
    g, p, e = TI_IMAGE // TI_PATCH, TI_PATCH, TI_E
    patches = pixels.reshape(3, g, p, g, p).permute(1, 3, 0, 2, 4).reshape(g * g, 3 * p * p)  # row-major patches
    x = patches @ sd["encoder.patch_embed.weight"].reshape(e, -1).T + sd["encoder.patch_embed.bias"]
    x = torch.cat([sd["encoder.class_embedding"], x]) + sd["encoder.positional_embedding"]
    latents = sd["latent_tokens"] + sd["encoder.latent_token_positional_embedding"]
    x = _ln(torch.cat([x, latents]), sd["encoder.ln_pre.weight"], sd["encoder.ln_pre.bias"])
    for i in range(TI_LAYERS):
        x = _block(sd, f"encoder.transformer.{i}.", x, heads=max(1, e // 64))  # S-128: 512 wide, 8 heads
    x = _ln(x[-TI_TOKENS:], sd["encoder.ln_post.weight"], sd["encoder.ln_post.bias"])  # [N, E]
    if legacy:  # (B, N, E) → (B, E, N, 1) by reshape, no permute
        grid = x[None].reshape(1, e, TI_TOKENS, 1)[0, :, :, 0]  # [E, N]
    else:
        grid = x.T
    conv = sd["encoder.conv_out.weight"][:, :, 0, 0]  # the 1×1 conv as a matmul
    z = (conv @ grid + sd["encoder.conv_out.bias"][:, None]).T  # [N, D]
    z = z / z.norm(dim=-1, keepdim=True)
    book = sd["quantize.embedding.weight"]
    book = book / book.norm(dim=-1, keepdim=True)
    return ((z[:, None, :] - book[None]) ** 2).sum(-1).argmin(1).tolist()


def test_titok_codes_match_the_official_legacy_computation(official):
    enc = load_encoder(official["out"], device="cpu")
    images = pictures(3, size=(48, 36))
    ours = enc.model.image_tokenizer(torch.stack([official_pixels(i).float() for i in images]))
    for img, codes in zip(images, ours):
        expected = official_titok_codes(official["state"], official_pixels(img))
        assert codes.tolist() == expected
        # the legacy reshape matters: the permuted (non-legacy) reading gives other ids
        assert official_titok_codes(official["state"], official_pixels(img), legacy=False) != expected
    assert len({tuple(c.tolist()) for c in ours}) == 3


def test_images_in_memory_are_resized_then_made_rgb_as_the_official_transform(official):
    """An RGBA or palette image given as a PIL object: resized in its own mode, then converted (alpha dropped),
    as the official transform orders it; converting first (transparency over white) gives other pixels."""
    enc = load_encoder(official["out"], device="cpu")
    rng = np.random.default_rng(4)
    rgba = Image.fromarray(rng.integers(0, 256, (37, 53, 4), np.uint8), "RGBA")
    palette = Image.fromarray(rng.integers(0, 256, (37, 53, 3), np.uint8)).quantize(16)
    for img in (rgba, palette):
        pixels = enc.prepare(img, None)["pixels"]
        np.testing.assert_allclose(pixels.numpy(), official_pixels(img).numpy(), atol=1e-6)
        assert not np.allclose(pixels.numpy(), official_pixels(as_rgb(img)).numpy(), atol=1e-3)
        ids = sequence_of(enc, [img], [None])[0].tolist()
        assert ids[:TI_TOKENS] == [c + IMAGE_OFFSET for c in official_titok_codes(official["state"],
                                                                                  official_pixels(img))]


def test_imported_model_matches_the_official_forward_pass(official):
    enc = load_encoder(official["out"], device="cpu")
    sd, vocab = official["state"], official["vocab"]
    text_ids = [CLIP_SOT, *expected_clip_pieces(vocab), CLIP_EOT]
    img = pictures(1, size=(48, 36))[0]
    codes = official_titok_codes(sd, official_pixels(img))
    image_text_ids = [c + IMAGE_OFFSET for c in codes] + text_ids
    image_only_ids = [c + IMAGE_OFFSET for c in codes] + [CLIP_SOT, CLIP_EOT]

    # the sequences our encoder builds are the official ones
    assert sequence_of(enc, [None], [CLIP_TEXT])[0].tolist() == text_ids
    assert sequence_of(enc, [img], [CLIP_TEXT])[0].tolist() == image_text_ids
    assert sequence_of(enc, [img], [None])[0].tolist() == image_only_ids

    got = enc.encode(images=[None, img, img], texts=[CLIP_TEXT, CLIP_TEXT, None])
    for vector, ids in zip(got, (text_ids, image_text_ids, image_only_ids)):
        np.testing.assert_allclose(vector, official_embedding(sd, ids).numpy(), atol=1e-5, rtol=0)
    # the comparison is sensitive: with one head instead of config.json's two the reference differs
    assert not np.allclose(official_embedding(sd, text_ids, heads=1).numpy(), got[0], atol=1e-3)


def test_imported_long_composed_text_keeps_eot_at_the_last_place(official):
    enc = load_encoder(official["out"], device="cpu")
    img = pictures(1)[0]
    long_text = "the red cat " * 100
    vocab = official["vocab"]
    pieces = [vocab["the</w>"], vocab["red</w>"], vocab["cat</w>"]] * 100
    seq = sequence_of(enc, [img], [long_text])[0].tolist()
    assert len(seq) == OFF_CTX and seq.count(CLIP_EOT) == 1
    # §1.5: beside 8 image ids, 172 text ids survive, SOT and EOT included (52 beside 128 in released models)
    assert seq[TI_TOKENS:] == [CLIP_SOT, *pieces[:OFF_CTX - TI_TOKENS - 2], CLIP_EOT]
    text_only = sequence_of(enc, [None], [long_text])[0].tolist()
    assert text_only == [CLIP_SOT, *pieces[:OFF_CTX - 2], CLIP_EOT]


# ---------------------------------------------------------------- 9. wrong state dicts are refused by name


def _import_modified(official, tmp_path: Path, change) -> Path:
    from retrieval.encoders.fuselip.official import import_fuselip

    state = dict(official["state"])
    change(state)
    folder = tmp_path / "bad"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text((official["folder"] / "config.json").read_text())
    return import_fuselip(folder, tmp_path / "out", tokenizer=official["folder"])


@pytest.mark.parametrize("key", ["transformer.resblocks.1.ln_2.bias", "ln_final.weight", TITOK + "latent_tokens",
                                 "mask_prediction_head.bias"])
def test_missing_key_is_named(official, tmp_path, key):
    with pytest.raises(RetrievalError, match=re.escape(key)):
        _import_modified(official, tmp_path, lambda s: s.pop(key))
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("key", ["text_projection", TITOK + "encoder.transformer.0.attn.extra",
                                 "mask_prediction_head.extra_bias"])
def test_unexpected_key_is_named(official, tmp_path, key):
    with pytest.raises(RetrievalError, match=re.escape(key)):
        _import_modified(official, tmp_path, lambda s: s.update({key: torch.zeros(OFF_W)}))


def test_stray_block_key_is_refused_with_the_block_named(official, tmp_path):
    """A key of a third block makes the depth 3, so the rest of that block is reported missing."""
    with pytest.raises(RetrievalError, match=re.escape("transformer.resblocks.2.")):
        _import_modified(official, tmp_path, lambda s: s.update({"transformer.resblocks.2.ln_1.weight":
                                                                   torch.zeros(OFF_W)}))


@pytest.mark.parametrize("key, shape", [("transformer.resblocks.0.mlp.c_fc.weight", (3 * OFF_W, OFF_W)),
                                         ("ln_final.bias", (OFF_W + 1,)),
                                         (TITOK + "encoder.conv_out.weight", (TI_D, TI_E, 2, 1)),
                                         ("logit_bias", (1,))])
def test_wrong_shape_is_named(official, tmp_path, key, shape):
    with pytest.raises(RetrievalError, match=re.escape(key)):
        _import_modified(official, tmp_path, lambda s: s.update({key: torch.zeros(shape)}))


def test_untied_decoder_is_refused(official, tmp_path):
    def untie(state):
        decoder = state["token_embedding.weight"].clone()
        decoder[5, 3] += 1.0
        state[DECODER] = decoder

    with pytest.raises(RetrievalError, match=re.escape(DECODER)):
        _import_modified(official, tmp_path, untie)


def test_unknown_codebook_is_refused(official, tmp_path):
    def other_codebook(state):
        state[TITOK + "quantize.embedding.weight"] = torch.randn(TI_C, 16)

    with pytest.raises(RetrievalError, match="codebook"):
        _import_modified(official, tmp_path, other_codebook)


def test_a_config_with_an_end_of_image_token_is_refused_by_name(official, tmp_path):
    """use_eoi: true makes the official encoder insert an end-of-image id after the image ids, which the import
    does not reproduce: refused, naming the setting, rather than embedded differently."""
    from retrieval.encoders.fuselip.official import import_fuselip

    folder = tmp_path / "eoi"
    folder.mkdir()
    state = dict(official["state"])
    rows = state["token_embedding.weight"]
    state["token_embedding.weight"] = torch.cat([rows, rows[:1]])  # the one extra id
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(official_config_json() | {"use_eoi": True}))
    with pytest.raises(RetrievalError, match="use_eoi: true") as refused:
        import_fuselip(folder, tmp_path / "out", tokenizer=official["folder"])
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


def test_module_prefix_is_stripped(official, tmp_path):
    path = _import_modified(official, tmp_path, lambda s: s.update({"module." + k: s.pop(k) for k in list(s)}))
    assert (path / "model.safetensors").is_file()


def test_module_prefixed_titok_decoder_keys_are_dropped(official, tmp_path):
    def local_checkpoint(state):
        state.update({"module." + k: state.pop(k) for k in list(state)})
        state["module." + TITOK + "decoder.ln_post.weight"] = torch.ones(4)

    path = _import_modified(official, tmp_path, local_checkpoint)
    assert (path / "model.safetensors").is_file()


def test_titok_decoder_keys_are_dropped(official, tmp_path):
    def with_decoder(state):
        state[TITOK + "decoder.ln_post.weight"] = torch.ones(4)
        state[TITOK + "pixel_decoder.conv.weight"] = torch.ones(2, 2)

    path = _import_modified(official, tmp_path, with_decoder)
    assert (path / "model.safetensors").is_file()


# ---------------------------------------------------------------- 10. the command line


@pytest.mark.slow
def test_cli_models_import(official, tmp_path):
    out = tmp_path / "cli-import"
    proc = run_cli("models", "import", "fuselip", official["folder"], "--out", out, "--tokenizer", official["folder"])
    assert "imported" in proc.stdout
    ours, python_import = load_encoder(out, device="cpu"), load_encoder(official["out"], device="cpu")
    texts = [CLIP_TEXT, ""]
    images = [None, pictures(1)[0]]
    np.testing.assert_array_equal(ours.encode(images=images, texts=texts),
                                  python_import.encode(images=images, texts=texts))
