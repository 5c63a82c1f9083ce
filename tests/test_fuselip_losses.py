"""FuseLIP's losses (reference: fuselip.md §2.1): SigLIP, token masking and the masked-token loss by hand."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval.training.losses import mask_tokens, masked_token_loss, siglip_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread


# ---------------------------------------------------------------- 6. losses against hand computations


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _siglip_by_hand(left, right, positives, s, b) -> float:
    total = 0.0
    for i, li in enumerate(left):
        for j, rj in enumerate(right):
            logit = math.exp(s) * sum(x * y for x, y in zip(li, rj)) + b
            total -= _log_sigmoid(logit if positives[i][j] else -logit)
    return total / len(left)


@pytest.mark.parametrize("positives", [
    [[1, 0], [0, 1]],
    [[0, 1], [1, 0]],
    [[1, 0], [1, 0]],  # not symmetric: both queries have the first target
    [[1, 0], [1, 0], [0, 1]],  # two queries share one target (a 3×2 batch)
])
def test_siglip_loss_equals_hand_computation(positives):
    left = [_unit([1.0, 2.0, -0.5]), _unit([-1.0, 0.3, 0.8]), _unit([0.2, -0.4, 1.0])][:len(positives)]
    right = [_unit([0.9, 1.5, 0.1]), _unit([-0.7, 0.1, 1.1])]
    s, b = math.log(10.0), -3.0
    got = siglip_loss(torch.tensor(left), torch.tensor(right), torch.tensor(positives, dtype=torch.bool),
                      torch.tensor(s), torch.tensor(b))
    assert got.item() == pytest.approx(_siglip_by_hand(left, right, positives, s, b), rel=1e-5)


def test_siglip_loss_initial_values_and_gradient():
    """At init (s = ln 10, b = −10) orthogonal pairs cost log(1+e^10) each positive and ~e^-10 each negative."""
    left, right = torch.eye(2), torch.eye(2)
    s = torch.tensor(math.log(10.0), requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    loss = siglip_loss(left, right, torch.eye(2, dtype=torch.bool), s, b)
    # positives: logit 10·1 − 10 = 0 → log 2 each; negatives: logit −10 → log(1+e^-10) each; sum / 2
    assert loss.item() == pytest.approx((2 * math.log(2) + 2 * math.log1p(math.exp(-10))) / 2, rel=1e-6)
    loss.backward()
    assert b.grad is not None and s.grad is not None and b.grad.item() < 0  # positives want a larger bias


def test_mask_tokens_never_masks_specials_but_can_mask_sot():
    sot, eot, pad, mask = 49406, 49407, 0, 49408
    ids = torch.tensor([[sot, 5, 6, 49409, 50000, eot, pad, pad], [mask, sot, 7, eot, pad, pad, pad, pad]])
    masked, where = mask_tokens(ids, 1.0, mask, [eot, pad, mask], torch.Generator().manual_seed(0))
    keep = torch.isin(ids, torch.tensor([eot, pad, mask]))
    assert torch.equal(where, ~keep)
    assert torch.equal(masked, torch.where(keep, ids, torch.full_like(ids, mask)))
    assert bool(where[0, 0]) and bool(where[1, 1])  # SOT is maskable

    nothing, none = mask_tokens(ids, 0.0, mask, [eot, pad, mask])
    assert torch.equal(nothing, ids) and not none.any()


def test_mask_tokens_fraction_and_determinism():
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(4, 1000, (300, 400), generator=gen)
    ids[:, -50:] = 0  # padding is never drawn
    ids[:, 10] = 2  # nor EOT
    masked, where = mask_tokens(ids, 0.1, 3, [2, 0, 3], torch.Generator().manual_seed(7))
    maskable = ~torch.isin(ids, torch.tensor([0, 2, 3]))
    fraction = where.sum().item() / maskable.sum().item()
    assert 0.095 < fraction < 0.105
    assert not where[~maskable].any() and (masked[where] == 3).all() and torch.equal(masked[~where], ids[~where])
    again, where_again = mask_tokens(ids, 0.1, 3, [2, 0, 3], torch.Generator().manual_seed(7))
    assert torch.equal(again, masked) and torch.equal(where_again, where)
    _, other = mask_tokens(ids, 0.1, 3, [2, 0, 3], torch.Generator().manual_seed(8))
    assert not torch.equal(other, where)


def test_masked_token_loss_equals_hand_cross_entropy():
    logits = [[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, -1.0, -1.0, 4.0]]
    targets = [0, 3, 1]
    by_hand = 0.0
    for row, t in zip(logits, targets):
        by_hand += -(row[t] - math.log(sum(math.exp(v) for v in row)))
    by_hand /= len(targets)
    got = masked_token_loss(torch.tensor(logits), torch.tensor(targets))
    assert got.item() == pytest.approx(by_hand, rel=1e-6)


def test_masked_token_loss_of_no_masked_position_is_zero():
    logits = torch.zeros(0, 7, requires_grad=True)
    loss = masked_token_loss(logits, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    loss.backward()  # keeps a gradient path
    assert logits.grad is not None
