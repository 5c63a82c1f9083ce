"""SPARC (reference: /work/shared/reference/sparc.md §2, §7) on tiny random models.

The fine-grained and global losses against hand computations (explicit loops over captions and words), padding
and degenerate captions, the alignment weights of the three threshold modes, score fusion and the fusion head
of the late-fusion encoder, a few training steps of SPARCObjective, and the word alignment / local scores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import COLOURS, shape_image, write_shape_images
from PIL import Image

from retrieval import RetrievalError
from retrieval.encoders.base import EncoderConfig
from retrieval.encoders.registry import get_config
from retrieval.encoders.sparc import SPARCEncoder
from retrieval.encoders.sparc.model import SPARC, alignment_weights
from retrieval.text_tokenizer import OWN_IDS, TextTokenizer
from retrieval.training.losses import fine_grained_loss, info_nce
from retrieval.training.pairs import Pair
from retrieval.training.sparc import SPARCObjective

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread

# tiny SPARC: 16×16 px, patch 4 → a 4×4 grid (P = 16), width 32, 12 ids of context
CTX = 12
GRID = 4
TOKENIZERS = "retrieval/checkpoints/tokenizers"


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


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.load(TOKENIZERS, OWN_IDS)


def tiny_encoder(tok: TextTokenizer, seed: int = 0, fusion_mode: str = "score", **model) -> SPARCEncoder:
    config = tiny_config(**model)
    torch.manual_seed(seed)
    return SPARCEncoder(config, SPARCEncoder.build_model(config), tokenizer=tok, fusion_mode=fusion_mode)


@pytest.fixture(scope="module")
def pair_images(tmp_path_factory) -> dict[str, str]:
    """PNG files `<colour>-<shape>` for four colours and two shapes."""
    return write_shape_images(tmp_path_factory.mktemp("sparc-images"))


# ---------------------------------------------------------------- hand computations (plain python / numpy)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt((v * v).sum())


def _fine_by_hand(tokens: np.ndarray, grouped: np.ndarray, words: np.ndarray, scale: float, mean: str) -> float:
    """Eq. 6 with the pseudo-code's token-level mean ("token") or its per-caption mean ("caption")."""
    e = math.exp(scale)
    per_caption, all_words = [], []
    for i in range(len(tokens)):
        idx = [j for j in range(tokens.shape[1]) if words[i][j]]
        losses = []
        for j in idx:
            t_j, c_j = _unit(tokens[i, j]), _unit(grouped[i, j])
            # t_j against the grouped embeddings of the caption's words
            num = math.exp(e * float(t_j @ c_j))
            den = sum(math.exp(e * float(t_j @ _unit(grouped[i, k]))) for k in idx)
            t_to_c = -math.log(num / den)
            # c_j against the caption's words
            den = sum(math.exp(e * float(c_j @ _unit(tokens[i, k]))) for k in idx)
            c_to_t = -math.log(num / den)
            losses.append(0.5 * (t_to_c + c_to_t))
        all_words.extend(losses)
        if idx:
            per_caption.append(sum(losses) / len(idx))
    if mean == "token":
        return sum(all_words) / len(all_words) if all_words else 0.0
    return sum(per_caption) / len(per_caption) if per_caption else 0.0


def _info_nce_by_hand(left: np.ndarray, right: np.ndarray, positives: list[list[int]], scale: float) -> float:
    e = math.exp(scale)
    z = [[e * float(_unit(a) @ _unit(b)) for b in right] for a in left]
    rows, cols = [], []
    for i in range(len(left)):
        if any(positives[i]):
            share = sum(math.exp(z[i][j]) for j in range(len(right)) if positives[i][j])
            rows.append(-math.log(share / sum(math.exp(v) for v in z[i])))
    for j in range(len(right)):
        if any(positives[i][j] for i in range(len(left))):
            share = sum(math.exp(z[i][j]) for i in range(len(left)) if positives[i][j])
            cols.append(-math.log(share / sum(math.exp(z[i][j]) for i in range(len(left)))))
    return 0.5 * (sum(rows) / len(rows) + sum(cols) / len(cols))


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


# ---------------------------------------------------------------- 1. the fine-grained loss by hand


def _fine_example(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B = 2 captions, L = 4 positions: caption 0 has words at 0..2, caption 1 at 1..2 (0 is SOT, 3 is EOT)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, grouped = torch.randn(2, 4, 5, generator=gen), torch.randn(2, 4, 5, generator=gen)
    words = torch.tensor([[True, True, True, False], [False, True, True, False]])
    return tokens, grouped, words


@pytest.mark.parametrize("mean", ["token", "caption"])
def test_fine_grained_loss_equals_hand_computation(mean):
    tokens, grouped, words = _fine_example()
    scale = math.log(5.0)
    got = fine_grained_loss(tokens, grouped, words, torch.tensor(scale), mean=mean)
    expected = _fine_by_hand(tokens.numpy(), grouped.numpy(), words.numpy(), scale, mean)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_fine_grained_token_and_caption_means_differ_and_bad_mean_is_refused():
    """Captions of 3 and 2 words: the token mean weighs the longer caption more than the caption mean does."""
    tokens, grouped, words = _fine_example(seed=1)
    scale = torch.tensor(math.log(5.0))
    by_token = fine_grained_loss(tokens, grouped, words, scale, mean="token").item()
    by_caption = fine_grained_loss(tokens, grouped, words, scale, mean="caption").item()
    assert by_token != pytest.approx(by_caption, rel=1e-4)
    with pytest.raises(ValueError, match="mean"):
        fine_grained_loss(tokens, grouped, words, scale, mean="batch")


def test_fine_grained_loss_uses_only_the_same_caption_as_negatives():
    """Changing another caption's embeddings leaves caption 0's loss (alone in a batch of one) as it was."""
    tokens, grouped, words = _fine_example(seed=2)
    scale = torch.tensor(math.log(5.0))
    alone = fine_grained_loss(tokens[:1], grouped[:1], words[:1], scale, mean="caption").item()
    both = fine_grained_loss(tokens, grouped, words, scale, mean="caption").item()
    second = fine_grained_loss(tokens[1:], grouped[1:], words[1:], scale, mean="caption").item()
    assert both == pytest.approx((alone + second) / 2, rel=1e-5)


# ---------------------------------------------------------------- 2. padding changes neither loss


@pytest.mark.parametrize("mean", ["token", "caption"])
def test_padding_changes_nothing_in_the_fine_grained_loss(mean):
    tokens, grouped, words = _fine_example(seed=3)
    scale = torch.tensor(math.log(20.0))
    base = fine_grained_loss(tokens, grouped, words, scale, mean=mean).item()

    gen = torch.Generator().manual_seed(4)
    extra = 3
    big_t = torch.cat([tokens, 100 * torch.randn(2, extra, 5, generator=gen)], 1)
    big_c = torch.cat([grouped, 100 * torch.randn(2, extra, 5, generator=gen)], 1)
    big_t[:, 3], big_c[:, 3] = 50 * torch.randn(2, 5, generator=gen), -80 * torch.randn(2, 5, generator=gen)
    big_t[1, 0], big_c[1, 0] = 1e3 * torch.randn(5, generator=gen), 1e3 * torch.randn(5, generator=gen)
    big_w = torch.cat([words, torch.zeros(2, extra, dtype=torch.bool)], 1)
    big_t.requires_grad_(True)
    big_c.requires_grad_(True)
    padded = fine_grained_loss(big_t, big_c, big_w, scale, mean=mean)
    assert padded.item() == pytest.approx(base, rel=1e-6)
    padded.backward()
    # padded positions get no gradient at all; words do
    assert torch.all(big_t.grad[~big_w] == 0) and torch.all(big_c.grad[~big_w] == 0)
    assert big_t.grad[big_w].abs().sum() > 0 and big_c.grad[big_w].abs().sum() > 0


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


# ---------------------------------------------------------------- 3. one-word and empty captions


@pytest.mark.parametrize("mean", ["token", "caption"])
def test_one_word_caption_contributes_zero_and_empty_caption_gives_no_nan(mean):
    tokens, grouped, _ = _fine_example(seed=6)
    scale = torch.tensor(math.log(5.0))
    one_word = torch.tensor([[False, True, False, False]])
    assert fine_grained_loss(tokens[:1], grouped[:1], one_word, scale, mean=mean).item() == pytest.approx(0, abs=1e-6)

    # with a 3-word caption: the one-word caption adds 0 to the sum (token mean: one more word in the count)
    words = torch.tensor([[True, True, True, False], [False, True, False, False]])
    three = _fine_by_hand(tokens[:1].numpy(), grouped[:1].numpy(), words[:1].numpy(), scale.item(), "token")
    expected = 3 * three / 4 if mean == "token" else three / 2
    got = fine_grained_loss(tokens, grouped, words, scale, mean=mean).item()
    assert got == pytest.approx(expected, rel=1e-5)

    # a caption without any word: no NaN, in the value or in the gradient, and it is left out of the mean
    empty = torch.tensor([[True, True, True, False], [False, False, False, False]])
    t, c = tokens.clone().requires_grad_(True), grouped.clone().requires_grad_(True)
    loss = fine_grained_loss(t, c, empty, scale, mean=mean)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(three, rel=1e-5)
    loss.backward()
    assert torch.isfinite(t.grad).all() and torch.isfinite(c.grad).all()
    assert torch.all(t.grad[1] == 0) and torch.all(c.grad[1] == 0)

    nothing = fine_grained_loss(t, c, torch.zeros(2, 4, dtype=torch.bool), scale, mean=mean)
    assert nothing.item() == 0.0


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


# ---------------------------------------------------------------- 5. InfoNCE by hand


LEFT = np.array([[1.0, 2.0, -0.5], [-1.0, 0.3, 0.8], [0.2, -0.4, 1.0]])
RIGHT = np.array([[0.9, 1.5, 0.1], [-0.7, 0.1, 1.1], [0.3, -1.0, 0.2]])


@pytest.mark.parametrize("positives", [
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    [[1, 0, 0], [1, 0, 0], [0, 1, 0]],  # rows 0 and 1 share column 0; column 2 is nobody's positive
    [[1, 1, 0], [0, 0, 1], [0, 0, 1]],  # row 0 has two positives; rows 1 and 2 share column 2
])
def test_info_nce_equals_hand_computation(positives):
    scale = math.log(4.0)
    left = torch.tensor(LEFT / np.linalg.norm(LEFT, axis=1, keepdims=True), dtype=torch.float32)
    right = torch.tensor(RIGHT / np.linalg.norm(RIGHT, axis=1, keepdims=True), dtype=torch.float32)
    got = info_nce(left, right, torch.tensor(positives, dtype=torch.bool), torch.tensor(scale))
    assert got.item() == pytest.approx(_info_nce_by_hand(LEFT, RIGHT, positives, scale), rel=1e-5)


def test_info_nce_of_a_column_without_positive_only_acts_as_a_negative():
    """Column 2 has no positive row: it adds to the rows' denominators, never a term of its own."""
    scale = torch.tensor(math.log(4.0))
    left = F.normalize(torch.tensor(LEFT, dtype=torch.float32), dim=-1)
    right = F.normalize(torch.tensor(RIGHT, dtype=torch.float32), dim=-1)
    pos = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    with_negative = info_nce(left, right, pos, scale).item()
    without = info_nce(left, right[:2], pos[:, :2], scale).item()
    assert with_negative > without and math.isfinite(with_negative)


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
        empty = model.text_features(torch.tensor([tok.row("", CTX)]))[0]
        t = model.text_features(torch.tensor([tok.row(text, CTX)]))[0]
        q = model.text_features(torch.tensor([tok.row(instruction, CTX)]))[0]
        fused_head = model.fusion_head(v[None], q[None])[0]
    image_only = _unit_t(_unit_t(v) + _unit_t(empty)).numpy()
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
                                                                  "make it red")]),
                             empty_text=headless._empty, mode="head")


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
    assert batch["text"][-1].tolist() == tok.row("", CTX)
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
