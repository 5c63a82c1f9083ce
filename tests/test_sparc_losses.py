"""SPARC's losses (reference: sparc.md §2, §7) against hand computations: fine-grained, InfoNCE, padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.training.losses import fine_grained_loss, info_nce

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread


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
