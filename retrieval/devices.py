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


def autocast_for(device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; none on CPU, where it measured slower than float32."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
