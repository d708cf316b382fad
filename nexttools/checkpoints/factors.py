"""The form in which every checkpoint reader hands out a trained module's change: two factors.

A LoRA module's change is ``s·B·A`` (or its transpose); a full-weight difference is returned by the
readers as dense tensors instead. :mod:`nexttools.lowrank` computes exact rank-1 triples from these
factors without ever forming the ``rows × cols`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True, eq=False)
class LowRankFactors:
    """A low-rank matrix ΔW = left @ right.T, in the orientation of the base weight.

    left: (rows, r) float32, right: (cols, r) float32. PEFT's scaling (and any transpose) is already
    folded in, so ``left @ right.T`` *is* the weight delta. Compared by identity (``eq=False``): the
    Gram cache keys on the object, and element-wise equality of big tensors is not a cheap ``==``.
    """

    left: Tensor
    right: Tensor

    def __post_init__(self) -> None:
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[1]:
            raise ValueError(
                f"factors must be (rows, r) and (cols, r); got {tuple(self.left.shape)} and "
                f"{tuple(self.right.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the delta."""
        return (self.left.shape[0], self.right.shape[0])

    @property
    def rank(self) -> int:
        """r, the inner dimension (an upper bound on the true rank)."""
        return self.left.shape[1]
