"""The networks of the NExt predictor (paper §4.2) and the σ features' scaling.

Each network maps a module's global and local rank-1 vectors to its target one,
``ŝ^T = D(concat(E_G(s^G), E_L(s^L))) + a·s^G + b·s^L``; one network per vector length, for u and
v, and one for σ. ``docs/predictor.md`` gives the architecture, where it departs from the public NExt
code and why, and the back-tests that chose the defaults below.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

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
