"""FDT's sparsemax against a brute-force projection onto the simplex: values, gradient, stability, half precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.encoders.fdt.sparsemax import sparsemax

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread


# ---------------------------------------------------------------- 1-3. sparsemax


def simplex_projection(a: np.ndarray) -> np.ndarray:
    """argmin ||w − a||² over the simplex, by bisection on τ (Σ max(a − τ, 0) = 1), in float64."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = a.max() - 1.0, a.max()  # Σ max(a − lo, 0) ≥ 1 ≥ Σ max(a − hi, 0) = 0
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(a - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(a - (lo + hi) / 2, 0)


def simplex_projection_by_support(a: np.ndarray) -> np.ndarray:
    """The same projection for tiny sizes from the KKT conditions, by trying every support S:
    τ = (Σ_S a − 1)/|S| with a_i > τ on S and a_j ≤ τ off S."""
    n = len(a)
    for mask in range(1, 2 ** n):
        support = [i for i in range(n) if mask >> i & 1]
        tau = (sum(a[i] for i in support) - 1) / len(support)
        if all(a[i] > tau for i in support) and all(a[j] <= tau for j in range(n) if j not in support):
            return np.array([a[i] - tau if i in support else 0.0 for i in range(n)])
    raise AssertionError("no support satisfies the KKT conditions")


def _threshold(a: np.ndarray) -> float:
    w = simplex_projection(a)
    i = int(np.argmax(w))
    return float(a[i] - w[i])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_sparsemax_equals_the_projection_found_by_trying_every_support(n):
    gen = torch.Generator().manual_seed(n)
    for scale in (0.1, 1.0, 4.0):
        a = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        expected = simplex_projection_by_support(a.tolist())
        np.testing.assert_allclose(sparsemax(a).numpy(), expected, atol=1e-12)
        np.testing.assert_allclose(simplex_projection(a.numpy()), expected, atol=1e-12)  # the two references agree


@pytest.mark.parametrize("n", [7, 50, 1000])
def test_sparsemax_equals_the_bisection_projection(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(4, n, generator=gen, dtype=torch.float64) * torch.tensor([[0.05], [1.0], [3.0], [20.0]],
                                                                             dtype=torch.float64)
    out = sparsemax(a)
    assert out.dtype == torch.float64 and out.shape == a.shape
    for row, got in zip(a.numpy(), out.numpy()):
        expected = simplex_projection(row)
        np.testing.assert_allclose(got, expected, atol=1e-10)
        assert (got >= 0).all() and got.sum() == pytest.approx(1.0, abs=1e-12)
        tau = _threshold(row)
        clear = np.abs(row - tau) > 1e-9  # entries not on the edge of the support
        assert np.array_equal(got[clear] == 0, expected[clear] == 0)  # exact zeros exactly where projected to 0
    # a spread-out input is mostly exact zeros; a flat one is dense
    spread, flat = out[3].numpy(), out[0].numpy()
    assert (spread == 0).sum() >= 0.8 * n and (spread > 0).sum() >= 1
    if n <= 50:
        assert (flat > 0).sum() >= 0.5 * n


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_sparsemax_along_any_dimension(dim):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64) * 2
    out = sparsemax(x, dim)
    expected = np.apply_along_axis(simplex_projection, dim % 3, x.numpy())
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(out.sum(dim).numpy(), 1.0, atol=1e-12)
    assert (out >= 0).all() and (out == 0).any()
    two_d = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 2
    for d in (0, 1):
        np.testing.assert_allclose(sparsemax(two_d, d).numpy(),
                                   np.apply_along_axis(simplex_projection, d, two_d.numpy()), atol=1e-10)


def _without_ties(shape: tuple[int, ...], dim: int, seed: int) -> torch.Tensor:
    """A random float64 input whose entries are all at least 1e-3 away from their slice's threshold τ (so the
    support does not change under gradcheck's finite differences)."""
    for s in range(seed, seed + 100):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64) * 1.5
        slices = np.moveaxis(x.numpy(), dim, -1).reshape(-1, shape[dim])
        if all(np.abs(row - _threshold(row)).min() > 1e-3 for row in slices):
            return x
    raise AssertionError("no input without near-ties")


@pytest.mark.parametrize("shape, dim", [((3, 7), -1), ((5, 4), 0), ((2, 6, 3), 1)])
def test_sparsemax_passes_gradcheck(shape, dim):
    x = _without_ties(shape, dim, seed=10).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sparsemax(t, dim), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparsemax_gradient_is_the_analytic_jacobian(dtype):
    """∂w/∂a = diag(s) − s sᵀ/|S| (s: the support indicator), applied to a random upstream gradient."""
    a = _without_ties((4, 9), -1, seed=20)
    g = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = a.clone().to(dtype).requires_grad_(True)
    (sparsemax(x) * g.to(dtype)).sum().backward()
    assert x.grad.dtype == dtype
    for row, grad, upstream in zip(a.numpy(), x.grad.double().numpy(), g.numpy()):
        s = (simplex_projection(row) > 0).astype(np.float64)
        jacobian = np.diag(s) - np.outer(s, s) / s.sum()
        np.testing.assert_allclose(grad, jacobian.T @ upstream, atol=1e-12 if dtype == torch.float64 else 1e-6)
        assert (grad[s == 0] == 0).all()  # no gradient reaches the entries outside the support


def test_sparsemax_is_stable_for_huge_inputs():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    expected = np.stack([simplex_projection(r) for r in a.numpy()])
    # float64: a shift of 1e4 changes nothing (τ shifts with it)
    np.testing.assert_allclose(sparsemax(a + 1e4).numpy(), expected, atol=1e-9)
    # float32: multiples of 2⁻⁸ + 1e4 are exact in float32, so the float32 result must match the float64 one
    q = torch.round(a * 256) / 256
    got = sparsemax((q + 1e4).float())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np.stack([simplex_projection(r) for r in q.numpy()]), atol=1e-6)
    # 1e30: ties share the mass, entries 2e30 below get none, and nothing overflows
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.tensor([[1e30, 1e30, 0.0, -1e30], [1e30, 1e30, 1e30, 1e30], [-1e30, 1e30, 0.0, 5.0]], dtype=dtype)
        out = sparsemax(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), torch.tensor([[0.5, 0.5, 0, 0], [0.25] * 4, [0, 1.0, 0, 0]],
                                                              dtype=torch.float64), atol=0, rtol=0)
        spread = torch.randn(5, 30, generator=gen).to(dtype) * 1e30
        out = sparsemax(spread)
        assert torch.isfinite(out).all()
        assert torch.equal(out.double(), F.one_hot(spread.double().argmax(1), 30).double())


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-3), (torch.bfloat16, 4e-3)])
def test_sparsemax_in_half_precision_matches_float64(dtype, atol):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 64, generator=gen) * torch.tensor([[0.02], [0.3], [1.0], [2.0], [5.0], [30.0]])).to(dtype)
    out = sparsemax(x)
    assert out.dtype == dtype and torch.isfinite(out).all() and (out >= 0).all()
    for row, got in zip(x.double().numpy(), out.double().numpy()):  # the reference on the rounded input
        expected = simplex_projection(row)
        np.testing.assert_allclose(got, expected, atol=atol)
        assert got.sum() == pytest.approx(1.0, abs=atol * 8)
        assert np.array_equal(got[expected > 2 * atol] > 0, np.ones(int((expected > 2 * atol).sum()), bool))
        assert (got[expected == 0] == 0).all()  # exact zeros survive the cast
    # values near the float16 maximum: k · z would overflow in float16 without the shift and the float32 compute
    big = torch.tensor([[65504.0, 65504.0, 65472.0, -65504.0], [60000.0, 59999.0, 1.0, 0.0]], dtype=dtype)
    out = sparsemax(big)
    assert torch.isfinite(out).all()
    expected = np.stack([simplex_projection(r) for r in big.double().numpy()])
    np.testing.assert_allclose(out.double().numpy(), expected, atol=atol)
