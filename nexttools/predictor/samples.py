"""The networks' samples: the (checkpoint row, module) pairs of a trajectory as scaled tensors.

Training and prediction read the same features the same way: u and v times √dim (O(1) entries at
every length), σ through :class:`~nexttools.predictor.network.SigmaScale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nexttools.errors import UserError
from nexttools.predictor.network import SigmaScale, net_key
from nexttools.store.trajectory import Trajectory


@dataclass(frozen=True)
class Batch:
    """Training samples of one network: inputs and target, each ``(N, dim)`` float32 (already scaled)."""

    global_: torch.Tensor
    local: torch.Tensor
    target: torch.Tensor


def training_batches(trajectory: Trajectory, rows: np.ndarray) -> tuple[dict[str, Batch], SigmaScale]:
    """Samples of every network from target rows ``rows``: the (row, module) pairs whose global and
    target deltas are non-zero and that hold no jump made while training (those are not the run's
    own motion). u/v are scaled by √dim; σ is log-standardised (scale returned)."""
    rows = trajectory.free_of_jumps(rows)
    sg = trajectory.global_.sigma[rows]
    st = trajectory.target.sigma[rows]
    pair_rows, pair_modules = np.nonzero((sg > 0) & (st > 0))
    if len(pair_rows) == 0:
        raise UserError("no module moved in the training rows (every global or target delta is zero)")
    pair_rows = rows[pair_rows]
    batches: dict[str, Batch] = {}
    for part, offset in (("u", trajectory.u_offset), ("v", trajectory.v_offset)):
        dims = np.diff(offset)[pair_modules]
        for dim in np.unique(dims):
            chosen = dims == dim
            g, l_ = _unit_inputs(trajectory, part, pair_rows[chosen], pair_modules[chosen], int(dim))
            t = _gather(
                getattr(trajectory.target, part), offset, pair_rows[chosen], pair_modules[chosen], int(dim)
            )
            batches[net_key(part, int(dim))] = Batch(g, l_, t * math.sqrt(dim))
    sg, sl = _sigma_inputs(trajectory, pair_rows, pair_modules)
    st = torch.from_numpy(trajectory.target.sigma[pair_rows, pair_modules].astype(np.float64))
    scale = SigmaScale.fit(sg, sl, st)
    batches["sigma"] = Batch(*scale.inputs(sg, sl), scale.encode_target(sg, st))
    return batches, scale


def _columns(offset: np.ndarray, modules: np.ndarray, dim: int) -> np.ndarray:
    """Column indices of the given modules' segments: ``(len(modules), dim)`` int64."""
    return offset[modules][:, None] + np.arange(dim)[None, :]


def _gather(
    values: np.ndarray, offset: np.ndarray, rows: np.ndarray, modules: np.ndarray, dim: int
) -> torch.Tensor:
    """``values[rows[n], segment of modules[n]]`` for every n: ``(N, dim)`` float32."""
    return torch.from_numpy(np.ascontiguousarray(values[rows[:, None], _columns(offset, modules, dim)]))


def _unit_inputs(
    trajectory: Trajectory, part: str, rows: np.ndarray, modules: np.ndarray, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global and local ``part`` vectors of the pairs, scaled by √dim: two ``(N, dim)`` float32."""
    offset = trajectory.u_offset if part == "u" else trajectory.v_offset
    scale = math.sqrt(dim)
    g = _gather(getattr(trajectory.global_, part), offset, rows, modules, dim)
    l_ = _gather(getattr(trajectory.local, part), offset, rows, modules, dim)
    return g * scale, l_ * scale


def _sigma_inputs(
    trajectory: Trajectory, rows: np.ndarray, modules: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ^G and σ^L of the pairs: two ``(N,)`` float64."""
    sg = torch.from_numpy(trajectory.global_.sigma[rows, modules].astype(np.float64))
    sl = torch.from_numpy(trajectory.local.sigma[rows, modules].astype(np.float64))
    return sg, sl
