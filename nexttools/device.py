"""The ``--device`` option shared by extract, fit and extrapolate."""

from __future__ import annotations

import torch

from nexttools.errors import UserError

DEVICE_HELP = "Where to compute: auto (CUDA when available), cpu, cuda or cuda:N."


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; an unavailable or unknown device is a ``UserError``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown --device {spec!r} (use auto, cpu or cuda[:N])") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported --device {spec!r} (use auto, cpu or cuda[:N])")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: torch sees no CUDA device (use --device auto or cpu)")
    return device
