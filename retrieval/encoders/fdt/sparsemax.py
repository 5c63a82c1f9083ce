"""Sparsemax (Martins & Astudillo 2016): the Euclidean projection of a score vector onto the simplex.

w = max(a − τ, 0) with τ chosen so that w sums to 1; found by sorting and a cumulative sum. Computed in at
least float32 after subtracting the maximum (τ shifts with the input), so large inputs and half
precision are safe. The backward pass is the exact Jacobian: g ↦ S ⊙ (g − mean of g over the support S).
"""

from __future__ import annotations

import torch


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, dim: int) -> torch.Tensor:
        compute = torch.promote_types(scores.dtype, torch.float32)
        z = scores.to(compute)
        z = z - z.amax(dim, keepdim=True)
        ordered = z.sort(dim, descending=True).values
        shape = [1] * z.ndim
        shape[dim] = -1
        k = torch.arange(1, z.shape[dim] + 1, dtype=compute, device=z.device).view(shape)
        cumulative = ordered.cumsum(dim)
        support = (1 + k * ordered > cumulative).sum(dim, keepdim=True)  # ≥ 1: the top entry always qualifies
        tau = (cumulative.gather(dim, support - 1) - 1) / support.to(compute)
        out = (z - tau).clamp(min=0)
        ctx.save_for_backward(out)
        ctx.dim = dim
        return out.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        on = (out > 0).to(out.dtype)
        g = grad.to(out.dtype) * on
        mean = g.sum(ctx.dim, keepdim=True) / on.sum(ctx.dim, keepdim=True)
        return (on * (g - mean)).to(grad.dtype), None


def sparsemax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparse probabilities along `dim`: non-negative, summing to 1, many exactly zero."""
    return _Sparsemax.apply(scores, dim if dim >= 0 else scores.ndim + dim)
