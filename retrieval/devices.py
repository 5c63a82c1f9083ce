"""Choosing the torch device from `auto|cpu|cuda`."""

from __future__ import annotations

import contextlib

from retrieval.errors import RetrievalError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> str:
    """Return "cuda" or "cpu"; asking for cuda on a machine without one is an error, not a silent CPU run."""
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise RetrievalError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RetrievalError(f"--device {device} was asked for, but torch sees no CUDA GPU here")
    return device


def autocast_for(device: str, bf16: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast if `bf16`, by default on CUDA only (CPU inference in bf16 measured slower than float32,
    before attention stayed float32 under CPU autocast; not measured since)."""
    import torch

    if bf16 is None:
        bf16 = device.startswith("cuda")
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
