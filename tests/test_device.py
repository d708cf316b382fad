"""``--device`` parsing, shared by extract, fit and extrapolate."""

from __future__ import annotations

import pytest
import torch

from nexttools.device import resolve_device
from nexttools.errors import UserError


def test_auto_and_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("spec", "message"), [("tpu", "unknown --device"), ("meta", "unsupported --device")])
def test_unknown_or_unsupported_devices_are_refused(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_gpu_names_the_option() -> None:
    with pytest.raises(UserError, match=r"--device cuda:1: torch sees no CUDA device"):
        resolve_device("cuda:1")
