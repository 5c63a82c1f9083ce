"""SPARC (reference: /work/shared/reference/sparc.md §2, §7) on tiny random models.

The text tower's pad mask, the alignment weights of the three threshold modes, score fusion and the fusion head
of the late-fusion encoder, a few training steps of SPARCObjective, and the word alignment / local scores. The
fine-grained and global losses against hand computations are in test_sparc_losses.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import COLOURS, shape_image, write_shape_images
from PIL import Image
from test_sparc_losses import _fine_by_hand, _info_nce_by_hand, _unit

from retrieval import RetrievalError
from retrieval.encoders.base import EncoderConfig
from retrieval.encoders.registry import get_config
from retrieval.encoders.sparc import SPARCEncoder
from retrieval.encoders.sparc.model import SPARC, alignment_weights
from retrieval.text_tokenizer import OWN_IDS, TextTokenizer
from retrieval.training.losses import info_nce
from retrieval.training.pairs import Pair
from retrieval.training.sparc import SPARCObjective

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread

# tiny SPARC: 16×16 px, patch 4 → a 4×4 grid (P = 16), width 32, 12 ids of context
CTX = 12
GRID = 4


def tiny_config(**model) -> EncoderConfig:
    base = get_config("sparc-tiny").to_dict()
    small = {"dim": 32, "patch": 4, "vision_width": 32, "vision_layers": 1, "vision_heads": 2, "text_vocab": 1024,
             "text_width": 32, "text_layers": 2, "text_heads": 2, "mlp_ratio": 2.0,
             "fusion_head": {"layers": 1, "heads": 2}}
    return EncoderConfig.from_dict(base | {"name": "sparc-test", "dim": 32, "image_size": 16, "context_length": CTX,
                                           "checkpoint": None, "model": base["model"] | small | model})


def tiny_model(seed: int = 0, **model) -> SPARC:
    torch.manual_seed(seed)
    return SPARCEncoder.build_model(tiny_config(**model))


def tiny_encoder(tok: TextTokenizer, seed: int = 0, fusion_mode: str = "score", **model) -> SPARCEncoder:
    config = tiny_config(**model)
    torch.manual_seed(seed)
    return SPARCEncoder(config, SPARCEncoder.build_model(config), tokenizer=tok, fusion_mode=fusion_mode)


@pytest.fixture(scope="module")
def pair_images(tmp_path_factory) -> dict[str, str]:
    """PNG files `<colour>-<shape>` for four colours and two shapes."""
    return write_shape_images(tmp_path_factory.mktemp("sparc-images"))


# ---------------------------------------------------------------- hand computations (plain python / numpy)


def _scaled_by_hand(tokens: np.ndarray, patches: np.ndarray, epsilon: float = 1e-6) -> np.ndarray:
    """Min-max of the raw token · patch dot products over the patches, per token, in float64: [B, L, P]."""
    out = np.zeros((tokens.shape[0], tokens.shape[1], patches.shape[1]))
    for b in range(tokens.shape[0]):
        for l_ in range(tokens.shape[1]):
            sim = np.array([float(np.dot(tokens[b, l_], p)) for p in patches[b]])
            out[b, l_] = (sim - sim.min()) / (sim.max() - sim.min() + epsilon)
    return out


def _weights_by_hand(tokens: np.ndarray, patches: np.ndarray, threshold: str) -> np.ndarray:
    scaled = _scaled_by_hand(tokens, patches)
    sigma = 1.0 / patches.shape[1]
    if threshold == "minmax":
        scaled = np.where(scaled >= sigma, scaled, 0.0)
    weights = scaled / scaled.sum(-1, keepdims=True)
    if threshold == "uniform":
        weights = np.where(weights >= sigma, weights, 0.0)
        weights = weights / weights.sum(-1, keepdims=True)
    return weights


# ---------------------------------------------------------------- 2. padding changes neither loss


def test_trailing_pad_ids_change_neither_the_global_text_feature_nor_the_global_loss():
    model = tiny_model(seed=5).eval()
    pad, sot, eot = OWN_IDS.pad, OWN_IDS.sot, OWN_IDS.eot
    rows = [[sot, 40, 41, 300, 500, 77, eot, pad], [sot, 99, 12, eot, pad, pad, pad, pad]]
    short = torch.tensor(rows)
    long = torch.tensor([r + [pad] * (CTX - 8) for r in rows])
    with torch.no_grad():
        g_short, t_short = model.text_outputs(short)
        g_long, t_long = model.text_outputs(long)
        images, _ = model.image_outputs(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(g_long, g_short, atol=1e-5, rtol=0)
    valid = short != pad
    torch.testing.assert_close(t_long[:, :8][valid], t_short[valid], atol=1e-5, rtol=0)
    # the global feature is the masked mean of the token embeddings (pads excluded, SOT/EOT included)
    for i, row in enumerate(rows):
        keep = [j for j, v in enumerate(row) if v != pad]
        torch.testing.assert_close(g_short[i], t_short[i, keep].mean(0), atol=1e-5, rtol=0)

    positives, scale = torch.eye(2, dtype=torch.bool), torch.tensor(math.log(10.0))
    args = (F.normalize(images, dim=-1), positives, scale)
    assert info_nce(F.normalize(g_long, dim=-1), *args).item() == pytest.approx(
        info_nce(F.normalize(g_short, dim=-1), *args).item(), rel=1e-5)
    # a real id where a pad was does change it: only the pad mask hides the pads
    changed = long.clone()
    changed[0, 8] = 55
    with torch.no_grad():
        assert not torch.allclose(model.text_outputs(changed)[0][0], g_short[0], atol=1e-4)


# ---------------------------------------------------------------- 4. alignment weights


def _align_example(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """2 pairs, 3 tokens, P = 16 patches. Patch 15 of pair 0 is a near copy of token 0's least similar patch, so
    that more patches than the minimum itself fall below the literal threshold (it drops few, §7.1)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, patches = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
    low = int((patches[0] @ tokens[0, 0]).argmin())
    patches[0, 15] = patches[0, low] + 0.02 * torch.randn(8, generator=gen)
    return tokens, patches


@pytest.mark.parametrize("threshold", ["minmax", "uniform", "off"])
def test_alignment_weights_are_a_distribution_per_word(threshold):
    tokens, patches = _align_example()
    weights = alignment_weights(tokens, patches, threshold)
    assert weights.shape == (2, 3, 16)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3), atol=1e-5, rtol=0)
    np.testing.assert_allclose(weights.numpy(), _weights_by_hand(tokens.numpy(), patches.numpy(), threshold),
                               atol=1e-5)


def test_minmax_threshold_zeros_exactly_the_patches_below_one_over_p():
    tokens, patches = _align_example()
    scaled = _scaled_by_hand(tokens.numpy(), patches.numpy())
    sigma = 1 / 16
    assert np.abs(scaled - sigma).min() > 1e-4  # no patch sits on the threshold
    below = scaled < sigma
    argmin = scaled == 0
    assert (below & ~argmin).any()  # more patches than the minimum itself are dropped in this example
    weights = alignment_weights(tokens, patches, "minmax").numpy()
    assert np.array_equal(weights == 0, below)
    # the survivors keep their min-max values, renormalised
    kept = np.where(below, 0.0, scaled)
    np.testing.assert_allclose(weights, kept / kept.sum(-1, keepdims=True), atol=1e-6)


def test_uniform_threshold_zeros_the_weights_below_a_uniform_share():
    tokens, patches = _align_example()
    scaled = _scaled_by_hand(tokens.numpy(), patches.numpy())
    share = scaled / scaled.sum(-1, keepdims=True)
    assert np.abs(share - 1 / 16).min() > 1e-4
    weights = alignment_weights(tokens, patches, "uniform").numpy()
    assert np.array_equal(weights == 0, share < 1 / 16)
    # far sparser than the literal reading (§7.1): about half the patches go
    assert (weights == 0).sum() > (alignment_weights(tokens, patches, "minmax") == 0).sum()


def test_off_threshold_keeps_every_patch_but_the_minimum():
    """No threshold: a = min-max / sum. Only the least similar patch (min-max value 0) has weight 0."""
    tokens, patches = _align_example()
    scaled = _scaled_by_hand(tokens.numpy(), patches.numpy())
    weights = alignment_weights(tokens, patches, "off").numpy()
    assert np.array_equal(weights == 0, scaled == 0) and (weights == 0).sum(-1).tolist() == [[1] * 3] * 2
    np.testing.assert_allclose(weights, scaled / scaled.sum(-1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("threshold", ["minmax", "uniform", "off"])
def test_alignment_weights_are_equivariant_to_patch_order(threshold):
    tokens, patches = _align_example(seed=8)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(9))
    base = alignment_weights(tokens, patches, threshold)
    torch.testing.assert_close(alignment_weights(tokens, patches[:, perm], threshold), base[..., perm],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("threshold", ["minmax", "uniform", "off"])
def test_degenerate_token_gets_uniform_weights(threshold):
    """A token with all similarities equal (here the zero vector) has max = min: uniform 1/P, no NaN (§7.2)."""
    tokens, patches = _align_example()
    tokens[0, 1] = 0
    weights = alignment_weights(tokens, patches, threshold)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights[0, 1], torch.full((16,), 1 / 16), atol=1e-7, rtol=0)


def test_group_is_the_weighted_sum_of_patches_with_gradient_through_the_weights():
    model = tiny_model(seed=1)
    tokens, patches = _align_example()
    tokens, patches = tokens[..., :4].repeat(1, 1, 8), patches[..., :4].repeat(1, 1, 8)  # width 32
    tokens.requires_grad_(True)
    weights, grouped = model.group(tokens, patches)
    expected = np.einsum("blp,bpd->bld", _weights_by_hand(tokens.detach().numpy(), patches.numpy(), "minmax"),
                         patches.numpy())
    np.testing.assert_allclose(grouped.detach().numpy(), expected, atol=1e-5)
    grouped.sum().backward()  # the paper does not stop the gradient of the weights (§7.8)
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_unknown_threshold_is_refused():
    with pytest.raises(RetrievalError, match="threshold"):
        tiny_model(threshold="softmax")


# ---------------------------------------------------------------- 6. score fusion and the fusion head


def _unit_t(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_fusion_modes_and_their_unimodal_items(tok):
    enc = tiny_encoder(tok, seed=2)
    model = enc.model
    img = shape_image(COLOURS["red"], "square")
    text, instruction = "a red square", "make it blue"
    images, texts = [img, None, img, img], [None, text, instruction, ""]

    score = enc.encode(images=images, texts=texts)
    enc.fusion_mode = "head"
    head = enc.encode(images=images, texts=texts)
    for vectors in (score, head):
        assert vectors.shape == (4, 32) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    with torch.no_grad():
        v = model.image_features(enc.prepare(img, None)["pixels"][None])[0]
        t = model.text_features(torch.tensor([tok.row(text, CTX)]))[0]
        q = model.text_features(torch.tensor([tok.row(instruction, CTX)]))[0]
        fused_head = model.fusion_head(v[None], q[None])[0]
    image_only = _unit_t(v).numpy()  # the image tower alone, as the official code embeds an image
    for vectors in (score, head):
        np.testing.assert_allclose(vectors[0], image_only, atol=1e-5)
        np.testing.assert_allclose(vectors[3], image_only, atol=1e-5)  # an empty text is no text
        np.testing.assert_allclose(vectors[1], _unit_t(t).numpy(), atol=1e-5)
    np.testing.assert_allclose(score[2], _unit_t(_unit_t(v) + _unit_t(q)).numpy(), atol=1e-5)
    np.testing.assert_allclose(head[2], _unit_t(fused_head).numpy(), atol=1e-5)
    np.testing.assert_array_equal(score[[0, 1, 3]], head[[0, 1, 3]])
    assert not np.allclose(score[2], head[2], atol=1e-3)
    assert enc.describe()["fusion_mode"] == "head"


def test_invalid_fusion_mode_and_missing_head_are_refused(tok):
    with pytest.raises(RetrievalError, match="fusion mode"):
        tiny_encoder(tok, fusion_mode="late")
    enc = tiny_encoder(tok)
    with pytest.raises(RetrievalError, match="fusion mode"):
        enc.fusion_mode = "mean"
    assert enc.fusion_mode == "score"

    headless = tiny_encoder(tok, fusion_head=None)
    assert headless.model.fusion_head is None
    assert headless.fusion_modes == ("score",)
    with pytest.raises(RetrievalError, match="no fusion head"):
        headless.fusion_mode = "head"
    with pytest.raises(RetrievalError, match="no fusion head"):  # and the model refuses it directly
        headless.model.embed(**headless.collate([headless.prepare(shape_image(COLOURS["blue"], "circle"),
                                                                  "make it red")]), mode="head")


# ---------------------------------------------------------------- 7. the objective and a few training steps


def make_pairs(paths: dict[str, str]) -> list[Pair]:
    def pair(group, qi, qt, ti, tt):
        return Pair(group=group, task="t", query_image=qi, query_text=qt, target_image=ti, target_text=tt)

    captions = [pair(f"cap{i}", paths[name], None, None, f"a {name.replace('-', ' ')}")
                for i, name in enumerate(["red-square", "green-circle", "blue-square", "yellow-circle",
                                          "blue-circle", "green-square"])]
    composed = [pair("edit0", paths["red-square"], "make it blue", paths["blue-square"], None),
                pair("edit1", paths["green-circle"], "make it yellow", paths["yellow-circle"], None),
                pair("edit2", paths["blue-square"], "make it a circle", paths["blue-circle"], None),
                pair("edit3", paths["yellow-circle"], "make it green", paths["green-circle"], None),
                pair("edit4", paths["green-square"], "make it red", paths["red-square"], None)]
    vqa = [pair("vqa", paths["red-square"], "what colour is the square?", None, "red")]
    return captions + composed + vqa


def test_objective_batch_and_loss_are_the_weighted_sum_of_the_terms(tok, pair_images):
    from retrieval.training.run import objective_for

    enc = tiny_encoder(tok, seed=3)
    pairs = make_pairs(pair_images)
    objective = objective_for(enc, pairs, "cpu", False)
    assert isinstance(objective, SPARCObjective)
    batch = objective.batch(pairs, torch.Generator().manual_seed(0))
    assert torch.equal(batch["caption_positives"], torch.eye(6, dtype=torch.bool))  # the 6 captions, not the rest
    assert batch["positives"].shape == (12, 12) and batch["positives"].sum(1).eq(1).all()
    distinct = {t for p in pairs for t in (p.query_text, p.target_text) if t}
    assert batch["text"].shape == (len(distinct), CTX)  # the pairs' own texts: no empty text is encoded
    with torch.no_grad():
        loss, logs = objective.loss(batch)
    w = objective.weights
    expected = sum(w[f"lambda_{k}"] * logs[k] for k in ("global", "fine", "fused", "head"))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert 1 <= logs["kept"] <= GRID * GRID

    # each term recomputed from the pairs themselves (the objective caches pixels in half precision: rel 2e-3)
    model, scale = enc.model, enc.model.logit_scale.item()
    captions = [(p.query_image, p.target_text) for p in pairs[:6]]
    with torch.no_grad():
        pixels = torch.stack([enc.prepare(Image.open(i).convert("RGB"), None)["pixels"] for i, _ in captions])
        ids = torch.tensor([tok.row(t, CTX) for _, t in captions])
        image_global, patches = model.image_outputs(pixels)
        text_global, tokens = model.text_outputs(ids)
    words = np.array([[i not in (OWN_IDS.sot, OWN_IDS.eot, OWN_IDS.pad) for i in row] for row in ids.tolist()])
    a = _weights_by_hand(tokens.numpy(), patches.numpy(), "minmax")
    grouped = np.einsum("blp,bpd->bld", a, patches.numpy())
    eye = np.eye(6, dtype=int).tolist()
    assert logs["fine"] == pytest.approx(_fine_by_hand(tokens.numpy(), grouped, words, scale, "token"), rel=2e-3)
    assert logs["global"] == pytest.approx(_info_nce_by_hand(text_global.numpy(), image_global.numpy(), eye, scale),
                                           rel=2e-3)
    assert logs["kept"] == pytest.approx(float((a > 0).sum(-1)[words].mean()), abs=1e-6)

    right = enc.encode(images=[p.target_image for p in pairs], texts=[p.target_text for p in pairs])
    left = enc.encode(images=[p.query_image for p in pairs], texts=[p.query_text for p in pairs])
    eye = np.eye(12, dtype=int).tolist()
    assert logs["fused"] == pytest.approx(_info_nce_by_hand(left, right, eye, scale), rel=2e-3)
    enc.fusion_mode = "head"
    composed = [k for k, p in enumerate(pairs) if p.query_image and p.query_text]
    assert len(composed) == 6
    head_left = enc.encode(images=[pairs[k].query_image for k in composed],
                           texts=[pairs[k].query_text for k in composed])
    assert logs["head"] == pytest.approx(_info_nce_by_hand(head_left, right, [eye[k] for k in composed], scale),
                                         rel=2e-3)


def test_a_batch_of_image_pairs_without_any_text_has_a_loss(tok, pair_images):
    from retrieval.training.run import objective_for

    enc = tiny_encoder(tok, seed=3)
    pairs = [Pair(group=f"g{k}", task="t", query_image=pair_images[a], query_text=None,
                  target_image=pair_images[b], target_text=None)
             for k, (a, b) in enumerate([("red-square", "blue-square"), ("blue-square", "red-square")])]
    objective = objective_for(enc, pairs, "cpu", False)
    batch = objective.batch(pairs, torch.Generator().manual_seed(0))
    assert batch["text"].shape == (0, CTX)
    loss, logs = objective.loss(batch)
    assert set(logs) == {"fused"} and torch.isfinite(loss)
    left = enc.encode(images=[p.query_image for p in pairs])
    right = enc.encode(images=[p.target_image for p in pairs])
    eye = np.eye(2, dtype=int).tolist()
    assert logs["fused"] == pytest.approx(_info_nce_by_hand(left, right, eye, enc.model.logit_scale.item()), rel=2e-3)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tok, pair_images):
    from retrieval.training.loop import TrainConfig, make_optimizer

    torch.manual_seed(0)
    enc = tiny_encoder(tok, seed=1)
    pairs = make_pairs(pair_images)
    objective = SPARCObjective(enc, pairs, progress=False)
    batch = objective.batch(pairs, torch.Generator().manual_seed(0))
    model = objective.model.train()
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.01))
    losses, logs_seen = [], []
    for _ in range(15):
        loss, logs = objective.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step()
        losses.append(loss.item())
        logs_seen.append(logs)
    assert all(math.isfinite(v) for v in losses)
    for key in ("global", "fine", "fused", "head", "kept"):
        assert key in logs_seen[0] and key in logs_seen[-1]
    assert losses[-1] < 0.6 * losses[0], losses  # about 0.3 on seeds 1-3
    assert logs_seen[-1]["global"] < logs_seen[0]["global"] and logs_seen[-1]["fused"] < logs_seen[0]["fused"]
    assert 0.0 <= model.logit_scale.item() <= math.log(100) + 1e-6


# ---------------------------------------------------------------- 8. word alignment and local scores


ALIGN_TEXT = "a red square left of a blue circle"


def test_alignment_labels_weights_and_local_scores(tok, pair_images):
    enc = tiny_encoder(tok, seed=4)
    model = enc.model
    images = [shape_image(COLOURS["red"], "square"), pair_images["blue-circle"],  # a PIL image or a path
              shape_image(COLOURS["green"], "circle")]
    labels, weights, scores = enc.alignment(ALIGN_TEXT, images)
    assert labels == ["a", "red", "square", "left", "of", "a", "blue", "circle"]
    assert weights.shape == (3, 8, GRID, GRID)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(3, 8), atol=1e-5, rtol=0)

    ids = tok.row(ALIGN_TEXT, CTX)
    word_positions = [j for j, i in enumerate(ids) if i not in (OWN_IDS.sot, OWN_IDS.eot, OWN_IDS.pad)]
    assert word_positions == list(range(1, 9))
    with torch.no_grad():
        _, tokens = model.text_outputs(torch.tensor([ids]))
        pixels = torch.stack([enc.prepare(i if isinstance(i, Image.Image) else Image.open(i).convert("RGB"),
                                          None)["pixels"] for i in images])
        _, patches = model.image_outputs(pixels)
    words = tokens[0, word_positions].numpy()
    expected_scores, expected_weights = [], []
    for n in range(len(images)):
        p = patches[n].numpy()
        a = _weights_by_hand(words[None], p[None], "minmax")[0]
        expected_weights.append(a.reshape(8, GRID, GRID))
        cos = []
        for l_ in range(len(words)):
            c = sum(a[l_, k] * p[k] for k in range(len(p)))
            cos.append(float(_unit(c) @ _unit(words[l_])))
        expected_scores.append(sum(cos) / len(cos))
    np.testing.assert_allclose(weights.numpy(), np.stack(expected_weights), atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-5)
    local = enc.local_scores(ALIGN_TEXT, images)
    assert isinstance(local, np.ndarray) and local.shape == (3,)
    np.testing.assert_allclose(local, expected_scores, atol=1e-5)
    assert len({round(float(s), 4) for s in local}) == 3  # the images do score differently


def test_alignment_of_a_text_without_words_is_refused(tok):
    enc = tiny_encoder(tok)
    with pytest.raises(RetrievalError, match="no words"):
        enc.alignment("", [shape_image(COLOURS["red"], "square")])
