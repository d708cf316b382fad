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
from nexttools.threads import cpu_workers, in_order, single_threaded_kernels


def train_nets(
    nets: dict[str, TrajectoryNet],
    batches: dict[str, Batch],
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    on_epoch: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """Train every network full-batch on its samples with the L1 loss; returns each one's final loss.

    Each network has its own AdamW and cosine schedule. The networks share no parameter and Adam's
    steps are per parameter, so this is what one optimiser over the sum of their losses would do;
    but separate, the networks train in parallel: on CPU one per worker thread, each with
    single-threaded kernels (:mod:`nexttools.threads`), the largest first. Why not torch's intra-op
    threads: an epoch is hundreds of small kernels, whose OpenMP teams wait for any thread a
    neighbouring job displaces; one thread per network runs them as fast (40 epochs of the
    Qwen-shaped store's networks on 2 cores: 5.4 s against 5.7 s alone, 7.7 s against 7.9 s beside
    one busy process), and its results do not depend on the thread count. ``on_epoch(key, loss)`` is called
    after every step of network ``key`` (from its worker thread). The networks are moved to
    ``device`` and left there in eval mode.
    """
    largest_first = sorted(nets, key=lambda key: -sum(p.numel() for p in nets[key].parameters()))

    def train(key: str) -> float:
        net, batch = nets[key], batches[key]
        return _train_one(key, net, batch, epochs=epochs, lr=lr, device=device, on_epoch=on_epoch)

    workers = cpu_workers(device)  # read before the kernels go single-threaded
    with single_threaded_kernels():
        losses = dict(zip(largest_first, in_order(train, largest_first, workers), strict=True))
    return {key: losses[key] for key in nets}


def _train_one(
    key: str,
    net: TrajectoryNet,
    batch: Batch,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    on_epoch: Callable[[str, float], None] | None,
) -> float:
    """:func:`train_nets` for one network ``key``; returns its final loss (in eval mode)."""
    net.to(device).train()
    global_, local, target = batch.global_.to(device), batch.local.to(device), batch.target.to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs, eta_min=FINAL_LR_FRACTION * lr)
    for _epoch in range(epochs):
        optimiser.zero_grad(set_to_none=True)
        loss = nn.functional.l1_loss(net(global_, local), target)
        loss.backward()
        optimiser.step()
        schedule.step()
        if on_epoch is not None:
            on_epoch(key, float(loss.detach()))
    net.eval()
    with torch.no_grad():
        return float(nn.functional.l1_loss(net(global_, local), target))


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
    latest: dict[str, float] = {}
    with _deterministic(), progress(TextColumn("loss {task.fields[loss]:.4g}")) as bar:
        task = bar.add_task(label, total=epochs * len(nets), loss=float("nan"))

        def on_epoch(key: str, loss: float) -> None:  # the mean of every network's latest loss
            latest[key] = loss
            bar.update(task, advance=1, loss=sum(latest.values()) / len(latest))

        losses = train_nets(nets, batches, epochs=epochs, lr=lr, device=device, on_epoch=on_epoch)
    return TrainedPredictor(nets=nets, sigma_scale=scale, architecture=architecture), losses
