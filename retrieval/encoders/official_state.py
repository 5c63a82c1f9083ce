"""Strict reading of official state dicts, shared by the importers: every key accounted for, every shape right."""

from __future__ import annotations

import re

import torch

from retrieval.errors import RetrievalError


def shape_of(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise RetrievalError(f"official state dict has no {key!r}")
    return tuple(state[key].shape)


def count_blocks(state: dict[str, torch.Tensor], pattern: str) -> int:
    """How many distinct values the first group of `pattern` takes over the keys (e.g. transformer depth)."""
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def check_keys(state: dict[str, torch.Tensor], expected: set[str]) -> None:
    """Refuse a state dict whose keys differ from `expected`, naming the missing and the unexpected ones."""
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RetrievalError("official state dict does not fit: "
                             + "; ".join(f"{label} keys: {', '.join(keys)}" for label, keys in
                                         (("missing", missing), ("unexpected", unexpected)) if keys))


def check_shapes(mapped: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], official_name=lambda k: k) -> None:
    """Refuse mapped tensors whose shapes differ from the model's, naming them by their official keys."""
    wrong = [f"{official_name(k)} {tuple(t.shape)} (expected {tuple(ours[k].shape)})"
             for k, t in mapped.items() if tuple(t.shape) != tuple(ours[k].shape)]
    if wrong:
        raise RetrievalError("official tensors with wrong shapes: " + ", ".join(wrong))
