"""``factor-linear``: each LoRA factor extrapolated linearly in the step, keeping the adapter's rank.

For every module, A_i ``(r, a)`` and B_i ``(b, r)`` of the last k+1 checkpoints (all of them when
the run is shorter, at least 2) are fitted element-wise by a least-squares line in the step and
evaluated at the common target step t: A', B'. They are rounded once to the checkpoint's dtype and
the jump is

    α·T̂ = s·B'A' − s·B_c A_c          (or its transpose, as PEFT applies the module)

so that the run's own adapter on the in-place base, and (A', B') on the original base, give the same
weights. Because (A', B') have the adapter's own shapes, they can be written into the run's own
checkpoint, whose optimizer state then stays valid (``--format checkpoint``).

Why it can work although LoRA factors are not unique (B A = (B M)(M⁻¹ A)): an optimiser moves A and
B continuously, so consecutive checkpoints share one gauge. In pilots of the TRL example's
"sharpening" regime it was the best jump in function space. The store holds no factors, so ``fit``
cannot back-test it.
"""

from __future__ import annotations

import torch

from nexttools.checkpoints.adapter import lora_delta
from nexttools.errors import UserError
from nexttools.lowrank import LowRankFactors
from nexttools.methods.base import Jump, JumpRequest, Method, line_window, target_step
from nexttools.run import OpenedRun


def _line_at(values: list[torch.Tensor], steps: torch.Tensor, at: float) -> torch.Tensor:
    """The least-squares line through (steps[i], values[i]) evaluated at ``at``, element-wise, float64."""
    stacked = torch.stack([v.to(torch.float64) for v in values])
    centred = steps - steps.mean()
    slope = torch.tensordot(centred, stacked - stacked.mean(0), dims=1) / centred.square().sum()
    return stacked.mean(0) + slope * (at - float(steps.mean()))


class _FactorLine:
    """The jumped factors of every module of ``run``, computed on demand (one module at a time)."""

    def __init__(self, run: OpenedRun, rows: list[int], target: float) -> None:
        self.run, self.rows, self.target = run, rows, target
        self.steps = torch.tensor([float(run.steps[r]) for r in rows], dtype=torch.float64)

    def new_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.run.adapter(row).stored_factors(name) for row in self.rows]
        if len({(tuple(a.shape), tuple(b.shape)) for a, b in pairs}) != 1:
            raise UserError(
                f"factor-linear needs the same LoRA rank at every checkpoint; {name} changes rank"
            )
        lora_a, lora_b = pairs[-1]
        new_a = _line_at([a for a, _ in pairs], self.steps, self.target).to(lora_a.dtype)
        new_b = _line_at([b for _, b in pairs], self.steps, self.target).to(lora_b.dtype)
        return new_a, new_b

    def change(self, name: str) -> LowRankFactors:
        last = self.run.adapter(self.run.rows - 1)
        jumped = lora_delta(last.modules[name], *self.new_factors(name))
        current = last.factors(name)
        return LowRankFactors(
            torch.cat([jumped.left, -current.left], dim=1), torch.cat([jumped.right, current.right], dim=1)
        )


class FactorLinear(Method):
    name = "factor-linear"
    summary = (
        "each LoRA factor A and B extrapolated linearly in the step over the last k+1 checkpoints; "
        "keeps the adapter's rank"
    )
    lora_only = True
    keeps_rank = True
    anchored = False
    backtest_note = "extrapolates the LoRA factors, which the store does not hold"

    def jump(self, request: JumpRequest) -> Jump:
        run = request.run
        rows = line_window(run, self.name)
        target = target_step(run.steps, run.k, request.alpha)
        line = _FactorLine(run, rows, target)
        return Jump(target_step=target, change=line.change, new_factors=line.new_factors)
