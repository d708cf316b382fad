"""The NExt trajectory predictor (paper §4.2): one network per vector length, for u, v and σ.

Each network maps the rank-1 vectors of a module's global and local deltas at checkpoint i,
``s^G_i`` and ``s^L_i``, to the rank-1 vector of its target delta ``s^T_i = rank1(ΔW_{i+k} − ΔW_i)``::

    h = concat(E_G(s^G), E_L(s^L))          E_G, E_L: MLPs (Linear, GELU, ...), width h
    ŝ^T = D(h) + a·s^G + b·s^L              D: MLP over the concatenation, back to the vector length

As in the paper, u, v and σ get separate networks, and all the vectors of one length (every module
and checkpoint whose u, or v, has that length) form one batch of one network. σ is the length-1 case.

Where this departs from the reference code, and why (``reference-implementations.md`` §2, §5):
- **Scaled inputs.** Unit vectors are multiplied by √dim so that their entries are O(1) at every
  length (a 8960-long unit vector has entries ~0.01). σ spans 1e-3..1e+1 across modules, so the σ
  network sees log σ^G and log(σ^L/σ^G) and predicts log(σ^T/σ^G), each standardised
  (:class:`SigmaScale`): σ̂ = σ^G·exp(ŷ) > 0 by construction, no clamp is needed. (Standardised
  raw log σ, tried first, left 23% σ error on a linear trajectory: its spread of ~10 log units
  turns a small standardised L1 error into a large relative one.)
- **A learned linear skip** ``a·s^G + b·s^L`` (two scalars per network, starting at 0). The
  reference architecture squeezes a d-long vector through width 256 with no skip, so it can only
  emit vectors of a 256-dim subspace learned from ~10 samples per module and cannot carry a
  direction it has not memorised; with the skip, "continue along the recent motion" is the
  starting point and the MLP learns the correction (the curvature). Measured where the bottleneck
  bites as it does on a real model (8 layers of the curved synthetic trajectory, 56 modules, width
  8): back-test cosine 0.865 with the skip, 0.479 without (below last-interval's 0.689); where it
  does not (the demo run at width 128) both reach 0.99.
- Activations between all layers (the reference stacks Linears with no activation between them),
  deterministic initialisation from the seed and the network's key, and full-batch AdamW with a
  cosine schedule instead of 1000 steps at lr 2e-5 (which barely moves the weights).

Defaults (``DEFAULT_*``): width 64, depth 2, 200 full-batch AdamW epochs, lr 1e-2 on a cosine
schedule down to 1e-3, no weight decay. Chosen on back-tests (``fit``, 3 held-out target rows of 10,
k=5) of the demo run (``examples/demo_run.py``, extracted) and of the curved and linear synthetic
trajectories of ``tests/test_methods.py`` (2 layers); overall cosine / σ error of ``next``:

    width/epochs/lr        demo           curved         linear
    64/200/1e-2 (default)  0.991 / 8.6%   0.997 / 9.6%   1.000 / 0.5%
    64/200/3e-3            0.983 / 9.0%   0.994 / 9.1%   1.000 / 0.2%
    64/200/1e-3            0.938 / 5.4%   0.974 / 8.1%   0.998 / 2.2%
    64/100/3e-3            0.948 / 5.2%   0.976 / 8.6%   1.000 / 2.7%
    32/200/3e-3            0.967 / 6.6%   0.980 / 8.4%   1.000 / 0.2%
    linear-rank1           0.624 / 5.3%   0.668 / 6.2%   1.000 / 0.0%
    last-interval          0.645 / 5.0%   0.721 / 5.6%   1.000 / 0.0%

Width 128 with 300 epochs reached 0.992 / 0.997 on demo / curved for 3× the compute (an epoch
costs ∝ width × Σ over samples of the vector length, which dominates on a Qwen2.5-1.5B-shaped
store), so 64 is where the cosine stops paying for the time. Note that on these curved
trajectories ``next`` wins on direction by far but its σ is slightly worse than the baselines'
(~9% vs ~5%).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from nexttools.errors import UserError
from nexttools.store import DeltaArrays, TrajectoryStore
from nexttools.trajectory import Trajectory, as_trajectory

DEFAULT_WIDTH = 64
DEFAULT_DEPTH = 2
DEFAULT_EPOCHS = 200
DEFAULT_LR = 1e-2
WEIGHT_DECAY = 0.0
FINAL_LR_FRACTION = 0.1  # the cosine schedule ends at this fraction of the learning rate
SIGMA_LOCAL_FLOOR = 1e-6  # σ^L below this fraction of σ^G is raised to it before the log


@dataclass(frozen=True)
class Architecture:
    """Shape of every network: ``width`` hidden units, ``depth`` Linear layers per encoder/decoder."""

    width: int = DEFAULT_WIDTH
    depth: int = DEFAULT_DEPTH


def _mlp(dims: list[int], final_activation: bool) -> nn.Sequential:
    """Linear layers through ``dims`` with a GELU after each one (and after the last if asked)."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(fan_in, fan_out))
        if final_activation or index < len(dims) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class TrajectoryNet(nn.Module):
    """E_G, E_L and D for vectors of one length ``dim``: ``(B, dim), (B, dim) -> (B, dim)``."""

    def __init__(self, dim: int, architecture: Architecture) -> None:
        super().__init__()
        self.dim = dim
        width, depth = architecture.width, architecture.depth
        self.encode_global = _mlp([dim] + [width] * depth, final_activation=True)
        self.encode_local = _mlp([dim] + [width] * depth, final_activation=True)
        self.decode = _mlp([2 * width] + [width] * (depth - 1) + [dim], final_activation=False)
        self.skip = nn.Parameter(torch.zeros(2))

    def forward(self, global_: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat([self.encode_global(global_), self.encode_local(local)], dim=-1)
        return self.decode(hidden) + self.skip[0] * global_ + self.skip[1] * local


def net_key(part: str, dim: int) -> str:
    """Name of the network for ``part`` ∈ {"u", "v", "sigma"} vectors of length ``dim`` (e.g. ``u1536``)."""
    return "sigma" if part == "sigma" else f"{part}{dim}"


def build_net(key: str, dim: int, architecture: Architecture, seed: int) -> TrajectoryNet:
    """A freshly initialised network whose weights depend only on (``seed``, ``key``, shape).

    The global RNG is forked, so neither the order in which networks are built nor anything else the
    caller does with torch's RNG changes the initialisation.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        return TrajectoryNet(dim, architecture)


@dataclass(frozen=True)
class Batch:
    """Training samples of one network: inputs and target, each ``(N, dim)`` float32 (already scaled)."""

    global_: torch.Tensor
    local: torch.Tensor
    target: torch.Tensor


@dataclass(frozen=True)
class Standardise:
    """``x = (value − mean) / std`` (std floored at 1e-3 so that a constant feature still works)."""

    mean: float
    std: float

    @staticmethod
    def fit(values: torch.Tensor) -> Standardise:
        values = values.double()
        return Standardise(float(values.mean()), max(float(values.std(unbiased=False)), 1e-3))

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return ((values.double() - self.mean) / self.std).float()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() * self.std + self.mean


@dataclass(frozen=True)
class SigmaScale:
    """The σ network's features, each standardised over the training samples:

    - input G: log σ^G (the module's scale, 1e-3..1e+1 → a few units);
    - input L: log(σ^L / σ^G), σ^L first raised to ``SIGMA_LOCAL_FLOOR``·σ^G (a checkpoint equal to
      the previous one has σ^L = 0, whose log is −∞);
    - target: log(σ^T / σ^G), so σ̂ = σ^G · exp(ŷ) > 0.

    Ratios to σ^G, not raw log σ: a ratio spreads over a fraction of a unit where log σ spreads over
    ten, so the same standardised L1 error is a far smaller relative error of σ̂.
    """

    global_: Standardise
    local: Standardise
    target: Standardise

    @staticmethod
    def fit(sigma_global: torch.Tensor, sigma_local: torch.Tensor, sigma_target: torch.Tensor) -> SigmaScale:
        """Statistics from the training samples' σ ``(N,)`` each (σ^G, σ^T > 0)."""
        g, l_ = _log_sigma_inputs(sigma_global, sigma_local)
        t = sigma_target.double().log() - sigma_global.double().log()
        return SigmaScale(Standardise.fit(g), Standardise.fit(l_), Standardise.fit(t))

    def inputs(
        self, sigma_global: torch.Tensor, sigma_local: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Network inputs ``(N, 1), (N, 1)`` float32 from σ^G > 0 and σ^L ≥ 0, each ``(N,)``."""
        g, l_ = _log_sigma_inputs(sigma_global, sigma_local)
        return self.global_.encode(g)[:, None], self.local.encode(l_)[:, None]

    def encode_target(self, sigma_global: torch.Tensor, sigma_target: torch.Tensor) -> torch.Tensor:
        """Network target ``(N, 1)`` float32."""
        return self.target.encode(sigma_target.double().log() - sigma_global.double().log())[:, None]

    def decode(self, sigma_global: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """σ̂ ``(N,)`` float64 from σ^G ``(N,)`` and network outputs ``(N, 1)``."""
        return sigma_global.double() * self.target.decode(y[:, 0].cpu()).exp()

    def to_json(self) -> dict[str, dict[str, float]]:
        return {"global": asdict(self.global_), "local": asdict(self.local), "target": asdict(self.target)}

    @staticmethod
    def from_json(document: dict[str, dict[str, float]]) -> SigmaScale:
        return SigmaScale(*(Standardise(**document[name]) for name in ("global", "local", "target")))


def _log_sigma_inputs(
    sigma_global: torch.Tensor, sigma_local: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    g = sigma_global.double().log()
    return g, torch.maximum(sigma_local.double(), SIGMA_LOCAL_FLOOR * sigma_global.double()).log() - g


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


def training_batches(trajectory: Trajectory, rows: np.ndarray) -> tuple[dict[str, Batch], SigmaScale]:
    """Samples of every network from target rows ``rows``: the (row, module) pairs whose global and
    target deltas are non-zero. u/v are scaled by √dim; σ is log-standardised (scale returned)."""
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


@dataclass
class TrainedPredictor:
    """Trained networks (keys from :func:`~nexttools.predictor.net_key`) and their σ scaling."""

    nets: dict[str, TrajectoryNet]
    sigma_scale: SigmaScale
    architecture: Architecture

    def predict(self, source: TrajectoryStore | Trajectory, row: int = -1) -> DeltaArrays:
        """Predicted target rank-1 of every module at store row ``row`` (the last by default).

        Returns σ̂ ``(M,)`` (> 0: the σ network predicts log σ), û ``(Σout,)`` and v̂ ``(Σin,)``
        renormalised to unit length per module, float32. Modules whose global delta at ``row`` is
        zero get σ̂ = 0 and û = v̂ = 0.
        """
        trajectory = as_trajectory(source)
        r = trajectory.row_index(row)
        live = np.flatnonzero(trajectory.global_.sigma[r] > 0)
        return self.predict_pairs(trajectory, np.full(len(live), r), live)

    def predict_pairs(self, trajectory: Trajectory, rows: np.ndarray, modules: np.ndarray) -> DeltaArrays:
        """Predictions for the (row, module) pairs ``zip(rows, modules)`` (all with σ^G > 0), scattered
        into 1-D arrays over all modules (a module appears at most once)."""
        device = next(iter(self.nets.values())).skip.device
        count = len(trajectory.modules)
        out = DeltaArrays(
            sigma=np.zeros(count, dtype=np.float32),
            u=np.zeros(int(trajectory.u_offset[-1]), dtype=np.float32),
            v=np.zeros(int(trajectory.v_offset[-1]), dtype=np.float32),
        )
        if len(modules) == 0:
            return out
        with torch.no_grad():
            for part, offset, target in (
                ("u", trajectory.u_offset, out.u),
                ("v", trajectory.v_offset, out.v),
            ):
                dims = np.diff(offset)
                for dim in np.unique(dims[modules]):
                    chosen = dims[modules] == dim
                    net = self._net(net_key(part, int(dim)), trajectory, modules[chosen])
                    g, l_ = _unit_inputs(trajectory, part, rows[chosen], modules[chosen], int(dim))
                    pred = net(g.to(device), l_.to(device)).double().cpu()
                    pred = pred / pred.norm(dim=1, keepdim=True).clamp_min(1e-30)
                    columns = _columns(offset, modules[chosen], int(dim))
                    target[columns.reshape(-1)] = pred.float().numpy().reshape(-1)
            sg, sl = _sigma_inputs(trajectory, rows, modules)
            net = self._net("sigma", trajectory, modules)
            g, l_ = self.sigma_scale.inputs(sg, sl)
            out.sigma[modules] = self.sigma_scale.decode(sg, net(g.to(device), l_.to(device))).float().numpy()
        return out

    def _net(self, key: str, trajectory: Trajectory, modules: np.ndarray) -> TrajectoryNet:
        if key not in self.nets:
            name = trajectory.modules[int(modules[0])]
            raise UserError(f"the predictor has no {key} network for {name}: it never saw it trained; refit")
        return self.nets[key]
