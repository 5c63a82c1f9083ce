"""The one training loop: AdamW (no decay on 1-D parameters), warm-up then cosine, gradient clipping,
bf16 autocast (on CUDA by default), a progress bar with the loss, and a state file that a rerun resumes from.

A family plugs in an `Objective`: it turns a list of pairs into a batch and a batch into a loss.
Batches and masking are drawn from (seed, step), so a resumed run takes exactly the steps it would have.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from retrieval.devices import autocast_for
from retrieval.errors import RetrievalError
from retrieval.files import atomic_path, read_json, write_json
from retrieval.training.pairs import Pair, batch_stream, caption_pairs, groups_of

STATE_FILE = "train_state.pt"
RUN_FILE = "train.json"
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    repeats: dict[str, int] = dataclasses.field(default_factory=dict)  # data set → times per epoch
    caption_share: float = 0.0  # of each batch: image–caption pairs drawn apart from the groups
    precision: str = "auto"  # of the forward pass: "auto" (bf16 autocast on CUDA), "bf16" or "fp32"

    def __post_init__(self):
        if not 0.0 <= self.caption_share < 1.0:
            raise RetrievalError(f"--caption-share must be in [0, 1), not {self.caption_share}")
        if self.precision not in PRECISIONS:
            raise RetrievalError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")

    @property
    def bf16(self) -> bool | None:
        """The `autocast_for` choice: None leaves it to the device (bf16 on CUDA)."""
        return None if self.precision == "auto" else self.precision == "bf16"


class Objective(Protocol):
    model: torch.nn.Module

    def batch(self, pairs: list[Pair], generator: torch.Generator) -> dict[str, Any]: ...

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def after_step(self) -> None: ...

    def save(self, out: Path) -> None: ...


def caption_slots(config: TrainConfig) -> int:
    return round(config.batch_size * config.caption_share)


def training_batches(objective: Objective, pairs: list[Pair], config: TrainConfig, start: int = 0
                     ) -> Iterator[dict[str, Any]]:
    """The objective's batches from step `start` on: the pairs and the masking both drawn from (seed, step),
    so a resumed run takes exactly the steps it would have."""
    stream = batch_stream(groups_of(pairs, config.repeats), config.batch_size, config.seed, start,
                          captions=caption_pairs(pairs), caption_slots=caption_slots(config))
    for step, indices in enumerate(stream, start):
        masking = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        yield objective.batch([pairs[i] for i in indices], masking)


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]  # biases, norms, logit scale and bias
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config.lr, betas=(0.9, 0.98), eps=1e-8)


def train(objective: Objective, pairs: list[Pair], config: TrainConfig, out: str | os.PathLike,
          device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training into `out`; the finished model is saved there by the objective."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = objective.model.to(device).train()
    optimizer = make_optimizer(model, config)
    run = {"config": dataclasses.asdict(config), "pairs": len(pairs)}
    start, history = resume(out, run, model, optimizer, device)
    batches = training_batches(objective, pairs, config, start)
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not progress)
    t0 = time.time()
    for step in range(start, config.steps):
        batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        with autocast_for(device, config.bf16):
            loss, logs = objective.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        objective.after_step()
        history.append({"step": step + 1, "loss": loss.item(), **logs})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", **{k: f"{v:.3f}" for k, v in logs.items()})
        bar.update()
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            save_state(out, run, model, optimizer, step + 1, history)
    bar.close()
    model.eval()
    objective.save(out)
    summary = run | {"steps_done": config.steps, "seconds_this_run": round(time.time() - t0, 1),
                     "final_loss": history[-1]["loss"] if history else None}
    write_json(out / RUN_FILE, summary | {"history": history})
    return summary


def save_state(out: Path, run: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               history: list[dict]) -> None:
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    with atomic_path(out / STATE_FILE) as tmp:
        torch.save(state, tmp)
    write_json(out / RUN_FILE, run | {"steps_done": step, "history": history})


def resume(out: Path, run: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           device: str) -> tuple[int, list[dict]]:
    """The step to start from (0 for a new run) and the loss history so far."""
    path = out / STATE_FILE
    if not path.is_file():
        return 0, []
    previous = read_json(out / RUN_FILE)
    # a run saved before a setting existed ran with its default
    settings = dataclasses.asdict(TrainConfig()) | previous.get("config", {})
    if settings != run["config"] or previous.get("pairs") != run["pairs"]:
        raise RetrievalError(f"{out} holds a run with other settings or data; use a new --out to start afresh")
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), [h for h in previous.get("history", []) if h["step"] <= state["step"]]
