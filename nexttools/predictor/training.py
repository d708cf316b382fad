"""Training the predictor's networks: full-batch AdamW on the L1 loss, deterministic from a seed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from rich.progress import TextColumn
from torch import nn

from nexttools.console import progress
from nexttools.predictor.network import (
    FINAL_LR_FRACTION,
    WEIGHT_DECAY,
    Architecture,
    TrajectoryNet,
    build_net,
)
from nexttools.predictor.samples import Batch, training_batches
from nexttools.predictor.trained import TrainedPredictor
from nexttools.store.trajectory import Trajectory


def train_nets(
    nets: dict[str, TrajectoryNet],
    batches: dict[str, Batch],
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train every network full-batch on its samples with the L1 loss; returns each one's final loss.

    One AdamW over all networks, minimising the sum of their mean L1 losses: the networks share no
    parameter, and Adam's steps do not depend on a gradient's scale, so this is the same as training
    each one alone, in one loop (one progress bar). ``on_epoch(epoch, mean loss)`` is called after
    every step. The networks are moved to ``device`` and left there in eval mode.
    """
    for net in nets.values():
        net.to(device).train()
    data = {
        key: Batch(b.global_.to(device), b.local.to(device), b.target.to(device))
        for key, b in batches.items()
    }
    params = [p for net in nets.values() for p in net.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs, eta_min=FINAL_LR_FRACTION * lr)
    for epoch in range(epochs):
        optimiser.zero_grad(set_to_none=True)
        losses = [
            nn.functional.l1_loss(nets[key](batch.global_, batch.local), batch.target)
            for key, batch in data.items()
        ]
        torch.stack(losses).sum().backward()
        optimiser.step()
        schedule.step()
        if on_epoch is not None:
            on_epoch(epoch, float(torch.stack(losses).detach().mean()))
    with torch.no_grad():
        for net in nets.values():
            net.eval()
        return {
            key: float(nn.functional.l1_loss(nets[key](batch.global_, batch.local), batch.target))
            for key, batch in data.items()
        }


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic torch kernels for the duration of a training (restored afterwards)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def train_predictor(
    trajectory: Trajectory,
    rows: np.ndarray,
    *,
    architecture: Architecture,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device,
    label: str,
) -> tuple[TrainedPredictor, dict[str, float]]:
    """Train fresh networks on target rows ``rows`` with a progress bar; returns them and final losses."""
    batches, scale = training_batches(trajectory, rows)
    dims = {key: batch.target.shape[1] for key, batch in batches.items()}
    nets = {key: build_net(key, dim, architecture, seed) for key, dim in dims.items()}
    with _deterministic(), progress(TextColumn("loss {task.fields[loss]:.4g}")) as bar:
        task = bar.add_task(label, total=epochs, loss=float("nan"))
        losses = train_nets(
            nets,
            batches,
            epochs=epochs,
            lr=lr,
            device=device,
            on_epoch=lambda _epoch, loss: bar.update(task, advance=1, loss=loss),
        )
    return TrainedPredictor(nets=nets, sigma_scale=scale, architecture=architecture), losses
