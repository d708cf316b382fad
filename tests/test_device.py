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


PROBE = """
import builtins, os
real_import, seen = builtins.__import__, []
def watch(name, *args, **kwargs):
    if name == "torch" and not seen:  # the value OpenMP will read: the one when torch first loads
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = watch
import nexttools.cli
print(seen[0])
"""


def test_the_cli_makes_idle_openmp_threads_sleep_unless_told_otherwise() -> None:
    """Spinning OpenMP threads made `fit` 20× slower on a shared node: the CLI asks for PASSIVE
    before torch is first imported, and keeps a value the user set."""
    import os
    import subprocess
    import sys

    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given is not None:
            env["OMP_WAIT_POLICY"] = given
        done = subprocess.run(
            [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == expected
