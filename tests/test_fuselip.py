"""FuseLIP (reference: /work/shared/reference/fuselip.md §1, §2.1, §5, §6) on tiny random models.

Sequence layout, padding, unit norm, vocabulary bounds and truncation on a tiny own-BPE model; the objective and
a few training steps. The losses against hand computations are in test_fuselip_losses.py, the importer in
test_fuselip_import.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from retrieval import RetrievalError
from retrieval.encoders.base import EncoderConfig
from retrieval.encoders.fuselip import FuseLIPEncoder
from retrieval.encoders.fuselip.model import FuseLIP, length_groups, row_lengths
from retrieval.encoders.registry import load_encoder
from retrieval.text_tokenizer import OWN_IDS, TextTokenizer, train_bpe
from retrieval.training.fuselip import FuseLIPObjective
from retrieval.training.losses import siglip_loss
from retrieval.training.pairs import Pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread

SENTENCES = [
    "a red square on a white background",
    "a blue circle next to a green triangle",
    "rotate the image ninety degrees clockwise",
    "the dog on the left and the cat on the right",
    "crop to upper left",
    "increase brightness by factor 1.5",
    "what colour is the large square?",
    "horizontal flip of a yellow star",
]

# tiny own-BPE model: 16×16 px → 16 conv-VQ ids (patch 4), 24 ids of context → 8 text ids beside an image
N_IMAGE = 16
CTX = 24
TEXT_VOCAB = 300
CODEBOOK = 32


def tiny_config(seed: int = 0) -> EncoderConfig:
    model = {
        "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 4.0, "text_vocab": TEXT_VOCAB, "image_offset": TEXT_VOCAB,
        "special_ids": OWN_IDS.to_dict(),
        "image_tokenizer": {"type": "conv-vq", "image_size": 16, "patch": 4, "channels": 16, "code_dim": 8,
                            "codebook_size": CODEBOOK, "l2_norm": True},
    }
    return EncoderConfig(name="fuselip-test", family="fuselip", dim=32, image_size=16, mean=(0.0, 0.0, 0.0),
                         std=(1.0, 1.0, 1.0), context_length=CTX, model=model, seed=seed)


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    tok = train_bpe(SENTENCES * 4, vocab_size=TEXT_VOCAB)
    assert tok.vocab_size <= TEXT_VOCAB
    return tok


def tiny_encoder(bpe: TextTokenizer, seed: int = 0) -> FuseLIPEncoder:
    config = tiny_config(seed)
    torch.manual_seed(seed)
    model = FuseLIPEncoder.build_model(config)
    with torch.no_grad():  # codebook rows taken from latents of noise images, so that images differ in their ids
        noise = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        latents = model.image_tokenizer.latents(noise).reshape(-1, 8)
        model.image_tokenizer.quantize.embedding.weight.copy_(latents[torch.randperm(len(latents))[:CODEBOOK]])
    return FuseLIPEncoder(config, model, tokenizer=bpe)


@pytest.fixture(scope="module")
def enc(bpe) -> FuseLIPEncoder:
    return tiny_encoder(bpe)


def pictures(n: int, size: tuple[int, int] = (20, 16)) -> list[Image.Image]:
    """Solid backgrounds with a differently placed, differently coloured rectangle and ellipse."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(3)]
        img = Image.new("RGB", size, colours[0])
        draw = ImageDraw.Draw(img)
        draw.rectangle([i % 7, (2 * i) % 5, size[0] // 2 + i % 5, size[1] // 2 + i % 3], fill=colours[1])
        draw.ellipse([size[0] // 2 - i % 4, size[1] // 2, size[0] - 1, size[1] - 1 - i % 3], fill=colours[2])
        out.append(img)
    return out


def sequence_of(enc: FuseLIPEncoder, images: list, texts: list) -> torch.Tensor:
    """The joint id rows the encoder feeds its transformer for aligned (image | None, text | None) items."""
    batch = enc.collate([enc.prepare(i, t) for i, t in zip(images, texts)])
    model = enc.model
    with torch.no_grad():
        return model.sequence(model.image_codes(batch["pixels"], batch["has_image"]), batch["has_image"],
                              batch["text"])


def embed_rows(model: FuseLIP, rows: list[list[int]] | torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.embed_ids(torch.as_tensor(rows, dtype=torch.long))


# ---------------------------------------------------------------- 1. image-only = (image, "") and its layout


def test_image_only_is_image_plus_empty_text_and_layout(enc):
    img = pictures(1)[0]
    alone, with_empty = enc.encode(images=[img]), enc.encode(images=[img], texts=[""])
    np.testing.assert_array_equal(alone, with_empty)

    ids = sequence_of(enc, [img], [None])[0].tolist()
    codes = enc.model.image_tokenizer(torch.from_numpy(
        np.asarray(img.resize((16, 16), Image.Resampling.BICUBIC), np.float32).transpose(2, 0, 1)[None] / 255))[0]
    sot, eot = OWN_IDS.sot, OWN_IDS.eot
    assert ids == [int(c) + TEXT_VOCAB for c in codes] + [sot, eot]  # [img×N][SOT][EOT], no begin-of-image
    # and the embedding is the one of exactly that id row
    np.testing.assert_allclose(alone[0], torch.nn.functional.normalize(embed_rows(enc.model, [ids]), dim=-1)[0],
                               atol=1e-6)
    # an image with text differs from the image alone
    assert not np.allclose(enc.encode(images=[img], texts=["a red square"]), alone, atol=1e-4)


# ---------------------------------------------------------------- 2. padding after EOT, batches of mixed lengths


def test_pad_after_eot_changes_nothing(enc):
    model, pad, sot, eot = enc.model, OWN_IDS.pad, OWN_IDS.sot, OWN_IDS.eot
    text = [sot, 40, 41, 77, 123, eot]
    composed = [TEXT_VOCAB + c for c in (3, 9, 0, 31, 5, 5, 2, 17)] + [sot, 60, 61, eot]
    for row in (text, composed):
        base = embed_rows(model, [row])
        for extra in (1, 3, CTX - len(row)):
            torch.testing.assert_close(embed_rows(model, [row + [pad] * extra]), base, atol=1e-6, rtol=0)
        # a real id after EOT does change it (attention is bidirectional): only the pad mask hides pads
        assert not torch.allclose(embed_rows(model, [row + [50, pad]]), base, atol=1e-4)


def test_batch_of_different_lengths_equals_rows_alone(enc):
    model, pad, sot, eot = enc.model, OWN_IDS.pad, OWN_IDS.sot, OWN_IDS.eot
    rows = [
        [sot, eot],
        [sot, 10, 11, 12, 13, 14, 15, 16, eot],
        [TEXT_VOCAB + c for c in range(N_IMAGE)] + [sot, eot],
        [TEXT_VOCAB + c for c in range(N_IMAGE, 0, -1)] + [sot, 99, 98, eot],
        [sot, 200, eot],
    ]
    width = max(map(len, rows)) + 2
    batch = embed_rows(model, [r + [pad] * (width - len(r)) for r in rows])
    alone = torch.cat([embed_rows(model, [r]) for r in rows])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)
    assert len({tuple(v.round(decimals=4).tolist()) for v in alone}) == len(rows)


def test_length_groups_split_rows_by_rounded_length(enc):
    """Rows group by 1 + their last non-padding position rounded up to the multiple (a pad inside a row
    keeps it long); a multiple no row reaches gives one group; no rows embed to no vectors."""
    pad, sot, eot = OWN_IDS.pad, OWN_IDS.sot, OWN_IDS.eot
    ids = torch.full((5, 20), pad)
    for i, row in enumerate([[sot, eot], [sot] + [7] * 7 + [eot], [sot] + [7] * 16 + [eot],
                             [sot, pad, eot], [sot] + [7] * 15 + [pad, eot]]):
        ids[i, :len(row)] = torch.tensor(row)
    lengths = row_lengths(ids, pad)
    assert lengths.tolist() == [2, 9, 18, 3, 18]
    assert [(n, g.tolist()) for n, g in length_groups(lengths, 8)] == [(8, [0, 3]), (16, [1]), (24, [2, 4])]
    assert [(n, g.tolist()) for n, g in length_groups(lengths, 1 << 30)] == [(1 << 30, [0, 1, 2, 3, 4])]
    assert enc.model.embed_ids(ids[:0]).shape == (0, enc.model.config.width)


def test_training_group_runs_cut_to_the_rounded_length_and_row_repeats_change_nothing(enc):
    """Encoding runs each group cut to its longest row; training (`row_multiple` > 1) cuts it to the rounded
    length (never past the batch) and repeats its first row up to the row multiple: every row's states stay
    as they were, and as the row's alone."""
    pad, sot, eot = OWN_IDS.pad, OWN_IDS.sot, OWN_IDS.eot
    ids = torch.full((7, 19), pad)
    for i, n in enumerate([2, 5, 9, 3, 18, 17, 11]):
        ids[i, :n] = torch.tensor([sot] + [7 + i] * (n - 2) + [eot])
    with torch.no_grad():
        plain = list(enc.model.hidden_by_length(ids))
        padded = list(enc.model.hidden_by_length(ids, row_multiple=4))
    assert [(g.tolist(), c.shape[1]) for g, c, _ in plain] == [([0, 1, 3], 5), ([2, 6], 11), ([4, 5], 18)]
    assert [(g.tolist(), c.shape[1]) for g, c, _ in padded] == [([0, 1, 3], 8), ([2, 6], 16), ([4, 5], 19)]
    for (group, chunk, hidden), (_, chunk_padded, hidden_padded) in zip(plain, padded):
        width = chunk.shape[1]
        assert hidden.shape == (len(group), width, enc.model.config.width)
        assert hidden_padded.shape == (len(group), chunk_padded.shape[1], enc.model.config.width)
        torch.testing.assert_close(hidden_padded[:, :width], hidden, atol=1e-5, rtol=1e-5)
        alone = enc.model.hidden(ids[group[-1:], :width])
        torch.testing.assert_close(hidden[-1:], alone, atol=1e-5, rtol=1e-5)


def test_cpu_autocast_keeps_attention_and_siglip_in_float32(enc, monkeypatch):
    """Under bf16 autocast on the CPU the projections run in bf16, but attention (whose bf16 CPU kernel is slow)
    and the SigLIP logits (near the bias, bf16 would merge hard negatives) stay float32; the states stay close."""
    from retrieval.devices import autocast_for

    seen, attention = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append(q.dtype)
        return attention(q, k, v, **kwargs)

    ids = torch.full((3, 12), OWN_IDS.pad)
    for i, n in enumerate([4, 12, 7]):
        ids[i, :n] = torch.tensor([OWN_IDS.sot] + [9 + i] * (n - 2) + [OWN_IDS.eot])
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        exact = enc.model.hidden(ids)
        with autocast_for("cpu", True):
            projected = enc.model.transformer.resblocks[0].attn.out_proj(exact)
            rounded = enc.model.hidden(ids)
            pooled = torch.nn.functional.normalize(enc.model.pool(rounded, ids).float(), dim=-1)
            loss = siglip_loss(pooled, pooled, torch.eye(3, dtype=torch.bool), enc.model.logit_scale,
                               enc.model.logit_bias)
    assert projected.dtype == torch.bfloat16  # autocast is really on
    assert len(seen) == 2 * enc.model.config.layers and set(seen) == {torch.float32}
    assert loss.dtype == torch.float32
    keep = ids != OWN_IDS.pad
    torch.testing.assert_close(rounded.float()[keep], exact[keep], atol=0.1, rtol=0.05)


def test_unknown_precision_is_refused():
    from retrieval.training.loop import TrainConfig

    assert TrainConfig(precision="bf16").bf16 and TrainConfig(precision="auto").bf16 is None
    with pytest.raises(RetrievalError, match="--precision must be one of auto, bf16, fp32"):
        TrainConfig(precision="fp16")


def test_attention_is_bidirectional(enc):
    """No causal mask (§6.6): a later id changes the state of the first position."""
    model, sot, eot = enc.model, OWN_IDS.sot, OWN_IDS.eot
    with torch.no_grad():
        a = model.hidden(torch.tensor([[sot, 10, 11, 12, eot]]))
        b = model.hidden(torch.tensor([[sot, 10, 11, 99, eot]]))
    assert not torch.allclose(a[0, 0], b[0, 0], atol=1e-5)


def test_encode_batched_equals_one_by_one(enc):
    images = pictures(4)
    items = [(images[0], None), (None, "a blue circle next to a green triangle"), (images[1], "crop to upper left"),
             (images[2], ""), (None, None), (images[3], "rotate the image ninety degrees clockwise " * 3)]
    imgs, texts = [i for i, _ in items], [t for _, t in items]
    together = enc.encode(images=imgs, texts=texts, batch_size=4)
    one_by_one = np.concatenate([enc.encode(images=[i], texts=[t]) for i, t in items])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


# ---------------------------------------------------------------- 3. unit norm


def test_embeddings_are_unit_norm(enc):
    images, texts = pictures(3), SENTENCES[:3]
    for kwargs in ({"texts": texts}, {"images": images}, {"images": images, "texts": texts}):
        vectors = enc.encode(**kwargs)
        assert vectors.shape == (3, 32) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # the raw pooled state is not unit norm: the encoder normalises it
    raw = embed_rows(enc.model, [[OWN_IDS.sot, 10, OWN_IDS.eot]])
    assert abs(float(raw.norm()) - 1) > 1e-3


# ---------------------------------------------------------------- 4. vocabulary bounds


def test_ids_stay_inside_the_vocabulary(enc):
    model = enc.model
    vocab = model.config.vocab_size
    assert vocab == TEXT_VOCAB + CODEBOOK == model.token_embedding.num_embeddings
    images = pictures(12, size=(23, 17)) + [Image.new("RGB", (16, 16), c) for c in ("black", "white", "red")]
    texts = ["", "ÄÖü ñ 漢字 🙂 ✓", "z" * 200, *SENTENCES] * 2
    texts = texts[:len(images)]
    seqs = sequence_of(enc, images, texts)
    assert seqs.min() >= 0 and seqs.max() < vocab
    image_part = seqs[:, :N_IMAGE]
    assert image_part.min() >= TEXT_VOCAB and image_part.max() < TEXT_VOCAB + CODEBOOK
    assert len(set(image_part.flatten().tolist())) > 3  # different images do give different ids
    text_part = seqs[:, N_IMAGE:]
    assert text_part.max() < TEXT_VOCAB  # no image id in the text part
    text_only = sequence_of(enc, [None] * len(texts), texts)
    assert text_only.min() >= 0 and text_only.max() < enc.tokenizer.vocab_size <= TEXT_VOCAB


# ---------------------------------------------------------------- 5. truncation


def test_long_text_is_cut_and_eot_kept(enc):
    long_text = " ".join(SENTENCES)
    pieces = enc.tokenizer.pieces(long_text)
    assert len(pieces) > CTX
    sot, eot = OWN_IDS.sot, OWN_IDS.eot
    img = pictures(1)[0]

    with_image = sequence_of(enc, [img], [long_text])[0].tolist()
    budget = CTX - N_IMAGE  # text ids that survive beside an image, SOT and EOT included
    assert len(with_image) == CTX
    assert with_image[N_IMAGE:] == [sot, *pieces[:budget - 2], eot]
    assert with_image[-1] == eot and with_image.count(eot) == 1
    assert with_image[:N_IMAGE] == sequence_of(enc, [img], [""])[0].tolist()[:N_IMAGE]

    text_only = sequence_of(enc, [None], [long_text])[0].tolist()
    assert text_only == [sot, *pieces[:CTX - 2], eot]

    # a text that just fits beside the image is not cut; one piece more is cut with EOT last
    words = long_text.split()
    fitting = next(" ".join(words[:k]) for k in range(len(words), 0, -1)
                   if len(enc.tokenizer.pieces(" ".join(words[:k]))) <= budget - 2)
    seq = sequence_of(enc, [img], [fitting])[0].tolist()
    assert seq[N_IMAGE:] == [sot, *enc.tokenizer.pieces(fitting), eot]


# ---------------------------------------------------------------- layers by hand (also for test_fuselip_import)


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


# ---------------------------------------------------------------- 7. the objective and a few training steps


@pytest.fixture(scope="module")
def pair_images(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pair-images")
    paths = {}
    for name, colour, shape in [("red", (220, 30, 30), "square"), ("green", (30, 200, 40), "circle"),
                                ("blue", (30, 40, 220), "square"), ("yellow", (230, 220, 20), "circle")]:
        img = Image.new("RGB", (24, 24), "white" if shape == "circle" else (40, 40, 40))
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)([4, 4, 19, 19], fill=colour)
        path = folder / f"{name}.png"
        img.save(path)
        paths[name] = str(path)
    return paths


def make_pairs(paths: dict[str, str]) -> list[Pair]:
    def pair(group, qi, qt, ti, tt):
        return Pair(group=group, task="t", query_image=qi, query_text=qt, target_image=ti, target_text=tt)

    return [
        pair("a", paths["red"], None, None, "a red square"),
        pair("b", paths["green"], None, None, "a green circle"),
        pair("c", paths["blue"], "", None, "a blue square"),
        pair("d", paths["yellow"], None, None, "a yellow circle"),
        pair("e", paths["red"], "make it blue", paths["blue"], None),
        pair("f", paths["green"], "make it yellow", paths["yellow"], ""),
        pair("g", None, "what colour is the square?", None, "red"),
    ]


def test_objective_batch_masks_both_sides_but_never_eot_or_pad(bpe, pair_images):
    enc = tiny_encoder(bpe, seed=3)
    pairs = make_pairs(pair_images)
    objective = FuseLIPObjective(enc, pairs, mask_probability=1.0, progress=False)
    batch = objective.batch(pairs, torch.Generator().manual_seed(0))
    # each pair's own target; and the blue and yellow images, asked alone for their captions, are also the
    # edits' targets: the same items, so positives too
    own = torch.eye(7, dtype=torch.bool)
    own[2, 4] = own[3, 5] = True
    assert batch["positives"].shape == (7, 7) and torch.equal(batch["positives"], own)
    mask = OWN_IDS.mask
    for ids, masked, where in batch["sides"].values():
        special = (ids == OWN_IDS.eot) | (ids == OWN_IDS.pad)
        assert torch.equal(where, ~special) and torch.equal(masked[special], ids[special])
        assert (masked[~special] == mask).all()
        assert (ids == OWN_IDS.eot).sum(1).eq(1).all()
    # the left side holds the image ids of the query images, in the image-first layout
    left_ids = batch["sides"]["left"][0]
    expected = sequence_of(enc, [Image.open(pair_images["red"])], [None])[0]
    assert torch.equal(left_ids[0, :len(expected)], expected)

    # with no masking the masked-modelling term is exactly zero and the loss is the SigLIP loss
    plain = FuseLIPObjective(enc, pairs, mask_probability=0.0, progress=False)
    loss, logs = plain.loss(plain.batch(pairs, torch.Generator().manual_seed(0)))
    assert logs["mmm"] == 0.0 and loss.item() == pytest.approx(logs["siglip"], rel=1e-6)

    # two queries with the same target: one target column, positive for both
    shared = [*pairs, Pair(group="h", task="t", query_image=None, query_text="red square?", target_image=None,
                           target_text="a red square")]
    positives = plain.batch(shared, torch.Generator().manual_seed(0))["positives"]
    assert positives.shape == (8, 7) and positives[[0, 1, 4, 5, 6, 7]].sum(1).eq(1).all()
    assert positives[[2, 3]].sum(1).eq(2).all()
    assert positives[0, 0] and positives[7, 0] and positives[:, 0].sum() == 2


def test_objective_loss_uses_the_masked_pass(bpe, pair_images):
    """§2.1: SigLIP on the embeddings of the masked pass + 0.25 × (CE left + CE right), the head reading the
    states before ln_final and predicting the original ids over the joint vocabulary."""
    enc = tiny_encoder(bpe, seed=4)
    pairs = make_pairs(pair_images)
    objective = FuseLIPObjective(enc, pairs, mask_probability=0.5, progress=False)
    batch = objective.batch(pairs, torch.Generator().manual_seed(1))
    model = objective.model
    with torch.no_grad():
        loss, logs = objective.loss(batch)
        embeddings, clean, ce = [], [], 0.0
        head = model.mask_prediction_head
        for ids, masked, where in batch["sides"].values():
            assert where.any() and not torch.equal(ids, masked)
            embeddings.append(torch.nn.functional.normalize(model.embed_ids(masked), dim=-1))
            clean.append(torch.nn.functional.normalize(model.embed_ids(ids), dim=-1))
            h = model.hidden(masked)[where]
            h = _ln(_gelu(h @ head.dense.weight.T + head.dense.bias), head.layer_norm.weight, head.layer_norm.bias)
            logits = h @ model.token_embedding.weight.T + head.bias
            assert logits.shape[1] == model.config.vocab_size
            ce += float(torch.nn.functional.cross_entropy(logits, ids[where]))
        args = (batch["positives"], model.logit_scale, model.logit_bias)
        siglip_masked, siglip_clean = siglip_loss(*embeddings, *args), siglip_loss(*clean, *args)
    assert logs["siglip"] == pytest.approx(float(siglip_masked), rel=1e-5)
    assert logs["siglip"] != pytest.approx(float(siglip_clean), rel=1e-3)
    assert logs["mmm"] == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(logs["siglip"] + 0.25 * ce, rel=1e-5)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(bpe, pair_images, bf16):
    """Also under bf16 autocast on the CPU (`train --precision bf16`), where attention runs in float32."""
    from retrieval.devices import autocast_for
    from retrieval.training.loop import TrainConfig, make_optimizer

    torch.manual_seed(0)
    enc = tiny_encoder(bpe, seed=1)
    pairs = make_pairs(pair_images)
    objective = FuseLIPObjective(enc, pairs, mask_probability=0.3, progress=False)
    batch = objective.batch(pairs, torch.Generator().manual_seed(0))
    model = objective.model.train()
    assert not model.image_tokenizer.training  # the frozen image tokenizer stays in eval mode
    codebook = model.image_tokenizer.quantize.embedding.weight.clone()
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.01))
    losses, logs_seen = [], []
    for _ in range(20):
        with autocast_for("cpu", bf16):
            loss, logs = objective.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step()
        losses.append(loss.item())
        logs_seen.append(logs)
    assert logs_seen[0]["mmm"] > 0 and logs_seen[0]["siglip"] > 0
    assert losses[-1] < 0.6 * losses[0], losses
    assert logs_seen[-1]["siglip"] < logs_seen[0]["siglip"] and logs_seen[-1]["mmm"] < logs_seen[0]["mmm"]
    assert torch.equal(model.image_tokenizer.quantize.embedding.weight, codebook)  # frozen
    assert 0.0 <= model.logit_scale.item() <= math.log(100) + 1e-6


def test_train_loop_saves_a_loadable_checkpoint(bpe, pair_images, tmp_path):
    from retrieval.training.loop import TrainConfig, train

    enc = tiny_encoder(bpe, seed=2)
    pairs = make_pairs(pair_images)
    objective = FuseLIPObjective(enc, pairs, progress=False)
    summary = train(objective, pairs, TrainConfig(steps=3, batch_size=4, warmup=1, save_every=10), tmp_path / "run",
                    progress=False)
    assert summary["steps_done"] == 3 and math.isfinite(summary["final_loss"])
    loaded = load_encoder(tmp_path / "run", device="cpu")
    assert isinstance(loaded, FuseLIPEncoder)
    images, texts = [pair_images["red"], None, pair_images["blue"]], [None, "a red square", "make it blue"]
    np.testing.assert_array_equal(loaded.encode(images=images, texts=texts), enc.encode(images=images, texts=texts))
    assert loaded.tokenizer.pieces("a red square") == bpe.pieces("a red square")


def test_tokenizer_wider_than_text_vocab_is_refused(bpe):
    config = tiny_config()
    config.model = dict(config.model, text_vocab=100, image_offset=100)
    with pytest.raises(RetrievalError, match="reserves 100 text ids"):
        FuseLIPEncoder(config, FuseLIPEncoder.build_model(config), tokenizer=bpe)


class _Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(bpe, pair_images, tmp_path):
    """Killed after the step-2 save, a rerun starts at step 2 and ends with the weights of an unbroken run."""
    from retrieval.training.loop import STATE_FILE, TrainConfig, train

    pairs = make_pairs(pair_images)
    config = TrainConfig(steps=5, batch_size=4, warmup=1, save_every=2)
    unbroken = FuseLIPObjective(tiny_encoder(bpe, seed=3), pairs, progress=False)
    train(unbroken, pairs, config, tmp_path / "unbroken", progress=False)

    broken = FuseLIPObjective(tiny_encoder(bpe, seed=3), pairs, progress=False)
    real_loss, calls = broken.loss, []

    def dying_loss(batch):
        calls.append(1)
        if len(calls) == 4:  # step 3 (0-based), after the state of step 2 was saved
            raise _Interrupt
        return real_loss(batch)

    broken.loss = dying_loss
    with pytest.raises(_Interrupt):
        train(broken, pairs, config, tmp_path / "broken", progress=False)
    assert torch.load(tmp_path / "broken" / STATE_FILE, weights_only=True)["step"] == 2
    resumed = FuseLIPObjective(tiny_encoder(bpe, seed=4), pairs, progress=False)  # other initial weights
    summary = train(resumed, pairs, config, tmp_path / "broken", progress=False)
    assert summary["steps_done"] == 5
    history = json.loads((tmp_path / "broken" / "train.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    for key, value in unbroken.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_rerun_with_other_settings_is_refused(bpe, pair_images, tmp_path):
    from retrieval.training.loop import TrainConfig, train

    pairs = make_pairs(pair_images)
    objective = FuseLIPObjective(tiny_encoder(bpe, seed=3), pairs, progress=False)
    train(objective, pairs, TrainConfig(steps=2, batch_size=4, warmup=1), tmp_path / "run", progress=False)
    with pytest.raises(RetrievalError, match="other settings"):
        train(objective, pairs, TrainConfig(steps=3, batch_size=4, warmup=1), tmp_path / "run", progress=False)


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(bpe, pair_images, tmp_path):
    """A train.json without `caption_share` (written before the setting existed) is the default run, not another."""
    from retrieval.training.loop import RUN_FILE, TrainConfig, train

    pairs = make_pairs(pair_images)
    objective = FuseLIPObjective(tiny_encoder(bpe, seed=3), pairs, progress=False)
    train(objective, pairs, TrainConfig(steps=2, batch_size=4, warmup=1), tmp_path / "run", progress=False)
    run = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    del run["config"]["caption_share"]
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(run))
    assert train(objective, pairs, TrainConfig(steps=2, batch_size=4, warmup=1), tmp_path / "run",
                 progress=False)["steps_done"] == 2
    with pytest.raises(RetrievalError, match="other settings"):
        train(objective, pairs, TrainConfig(steps=2, batch_size=4, warmup=1, caption_share=0.25), tmp_path / "run",
              progress=False)
