"""`retrieval bench train`: the training step of a model with length-grouped training (FuseLIP's) three ways:
one padded batch in float32 (the baseline), rows run in length groups in float32, and length groups under bf16
autocast.

Every variant takes forward and backward on the same batches of the training stream (the loop's grouping,
caption share and masking, for the same seed), in an order that turns each step, with the weights held
fixed. Padding is masked, so the float32 losses must agree on every batch; bf16 differs by its rounding.
The first `WARMUP_STEPS` are not timed: they also compile the CPU's bf16 kernels for the first shapes.
"""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any

from evaluation.bench.common import format_table, thread_count, timed

WARMUP_STEPS = 5
ONE_BATCH = 1 << 30  # a length multiple no sequence reaches: every row in one group
VARIANTS = ("padded", "grouped", "grouped-bf16")


def bench_train(model: str, data: list[str | os.PathLike], steps: int = 40, batch_size: int = 128,
                caption_share: float = 0.25, repeats: dict[str, int] | None = None, device: str = "auto",
                threads: int | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Time `steps` training steps each way on the same batches; returns the report."""
    import torch
    from tqdm import tqdm

    from retrieval.devices import autocast_for, resolve_device
    from retrieval.encoders.families import require
    from retrieval.errors import RetrievalError
    from retrieval.training.loop import TrainConfig, training_batches
    from retrieval.training.pairs import read_pairs
    from retrieval.training.run import encoder_to_train, objective_for

    if steps <= WARMUP_STEPS:
        raise RetrievalError(f"--steps must be more than the {WARMUP_STEPS} untimed warm-up steps")
    config = TrainConfig(batch_size=batch_size, caption_share=caption_share, repeats=repeats or {}, seed=seed)
    encoder = encoder_to_train(model)
    require(encoder, "length_groups", "bench train")
    device = resolve_device(device)
    pairs = read_pairs(data)
    objective = objective_for(encoder, pairs, device, progress)
    objective.model.to(device).train()
    length_multiple = objective.length_multiple
    settings = {"padded": (ONE_BATCH, False), "grouped": (length_multiple, False),
                "grouped-bf16": (length_multiple, True)}
    batches = training_batches(objective, pairs, config)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    groups, worst = [], dict.fromkeys(VARIANTS[1:], 0.0)
    with thread_count(threads):
        torch_threads = torch.get_num_threads()
        for step in tqdm(range(steps), desc="bench train", unit="step", disable=not progress):
            batch = next(batches)
            groups += objective.groups_per_side(batch, length_multiple)
            losses = {}
            for name in VARIANTS[step % 3:] + VARIANTS[: step % 3]:
                objective.length_multiple, bf16 = settings[name]
                objective.model.zero_grad(set_to_none=True)
                with timed() as t:
                    with autocast_for(device, bf16):
                        loss, _ = objective.loss(batch)
                    loss.backward()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                losses[name] = loss.item()
                if step >= WARMUP_STEPS:
                    seconds[name].append(t["seconds"])
            for name in worst:
                worst[name] = max(worst[name], abs(losses[name] - losses["padded"]) / abs(losses["padded"]))
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
        "length_multiple": length_multiple,
        "row_multiple": objective.row_multiple,
        "mean_groups_per_side": statistics.mean(groups),
        "seconds_per_step": median,
        "speedup": {name: median["padded"] / median[name] for name in VARIANTS},
        "max_relative_loss_difference": worst,
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """The printed form of a `bench_train` report."""
    median, speedup, worst = report["seconds_per_step"], report["speedup"], report["max_relative_loss_difference"]
    groups = f"length groups (multiple {report['length_multiple']}, {report['mean_groups_per_side']:.1f} per side)"
    labels = {"padded": "one padded batch, float32", "grouped": f"{groups}, float32",
              "grouped-bf16": f"the same groups, rows padded to a multiple of {report['row_multiple']}, bf16 autocast"}
    return [
        f"train bench: {report['model']} on {report['device']}, batch {report['batch_size']} (caption share "
        f"{report['caption_share']}, seed {report['seed']}), {report['timed_steps']} timed steps, "
        f"{report['torch_threads']} torch threads, {report['cpu_count']} CPUs; forward + backward, median "
        "seconds per step", "",
        format_table([["", "s/step", "vs padded"]]
                     + [[labels[name], f"{median[name]:.3f}", f"{speedup[name]:.2f}"] for name in VARIANTS]),
        "", "largest relative loss difference from the padded batch: "
            f"float32 groups {worst['grouped']:.1e}, bf16 groups {worst['grouped-bf16']:.1e}",
    ]
