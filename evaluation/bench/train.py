"""`retrieval bench train`: FuseLIP's training step with rows run in length groups against one padded batch.

Both variants take forward and backward on the same batches of the training stream (the loop's grouping,
caption share, masking and autocast, for the same seed), alternating which goes first, with the weights
held fixed. Padding is masked, so the two losses must agree on every batch. The first `WARMUP_STEPS` are
not timed.
"""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any

from evaluation.bench.common import format_table, thread_count, timed

WARMUP_STEPS = 2
ONE_BATCH = 1 << 30  # a length multiple no sequence reaches: every row in one group


def bench_train(model: str, data: list[str | os.PathLike], steps: int = 20, batch_size: int = 128,
                caption_share: float = 0.25, repeats: dict[str, int] | None = None, device: str = "auto",
                threads: int | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Time `steps` training steps both ways on the same batches; returns the report."""
    import torch
    from tqdm import tqdm

    from retrieval.devices import autocast_for, resolve_device
    from retrieval.encoders.fuselip.model import length_groups, row_lengths
    from retrieval.errors import RetrievalError
    from retrieval.training.loop import TrainConfig, training_batches
    from retrieval.training.pairs import read_pairs
    from retrieval.training.run import encoder_to_train, objective_for

    if steps <= WARMUP_STEPS:
        raise RetrievalError(f"--steps must be more than the {WARMUP_STEPS} untimed warm-up steps")
    config = TrainConfig(batch_size=batch_size, caption_share=caption_share, repeats=repeats or {}, seed=seed)
    encoder = encoder_to_train(model)
    if encoder.config.family != "fuselip":
        raise RetrievalError(f"bench train times FuseLIP's length groups; {model} is a {encoder.config.family} model")
    device = resolve_device(device)
    pairs = read_pairs(data)
    objective = objective_for(encoder, pairs, device, progress)
    objective.model.to(device).train()
    grouped_multiple = objective.length_multiple
    pad = objective.model.config.special_ids.pad
    batches = training_batches(objective, pairs, config)
    seconds: dict[str, list[float]] = {"padded": [], "grouped": []}
    groups, worst = [], 0.0
    with thread_count(threads):
        torch_threads = torch.get_num_threads()
        _ = objective.codes  # tokenise the training images before timing
        for step in tqdm(range(steps), desc="bench train", unit="step", disable=not progress):
            batch = next(batches)
            groups += [len(length_groups(row_lengths(ids, pad), grouped_multiple))
                       for ids, _, _ in batch["sides"].values()]
            losses = {}
            for name in ("padded", "grouped") if step % 2 else ("grouped", "padded"):
                objective.length_multiple = ONE_BATCH if name == "padded" else grouped_multiple
                objective.model.zero_grad(set_to_none=True)
                with timed() as t:
                    with autocast_for(device):
                        loss, _ = objective.loss(batch)
                    loss.backward()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                losses[name] = loss.item()
                if step >= WARMUP_STEPS:
                    seconds[name].append(t["seconds"])
            worst = max(worst, abs(losses["grouped"] - losses["padded"]) / abs(losses["padded"]))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "benchmark": "train",
        "model": encoder.name,
        "device": device,
        "torch_threads": torch_threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "batch_size": batch_size,
        "caption_share": caption_share,
        "seed": seed,
        "timed_steps": steps - WARMUP_STEPS,
        "length_multiple": grouped_multiple,
        "mean_groups_per_side": statistics.mean(groups),
        "seconds_per_step": median,
        "speedup": median["padded"] / median["grouped"],
        "max_relative_loss_difference": worst,
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """The printed form of a `bench_train` report."""
    median = report["seconds_per_step"]
    return [
        f"train bench: {report['model']} on {report['device']}, batch {report['batch_size']} (caption share "
        f"{report['caption_share']}, seed {report['seed']}), {report['timed_steps']} timed steps, "
        f"{report['torch_threads']} torch threads, {report['cpu_count']} CPUs; forward + backward, median "
        "seconds per step", "",
        format_table([
            ["", "s/step", "vs padded"],
            ["one padded batch", f"{median['padded']:.3f}", "1.00"],
            [f"length groups (multiple {report['length_multiple']}, {report['mean_groups_per_side']:.1f} per side)",
             f"{median['grouped']:.3f}", f"{report['speedup']:.2f}"],
        ]),
        "", f"largest relative loss difference between the two: {report['max_relative_loss_difference']:.1e}",
    ]
