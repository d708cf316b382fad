"""Helpers for tests that write real FSDP checkpoints with 2 gloo processes on CPU."""

from __future__ import annotations

import os
import socket
from pathlib import Path

WORLD = 2


class Planted:
    """A pickle that creates ``marker`` if anything ever unpickles it without ``weights_only``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.marker),))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def join_gloo(rank: int, port: int) -> None:
    """Join the 2-process gloo group (and accelerate's state, which its save functions log through)."""
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def assert_extracts_like_peft(
    peft_root: Path,
    sharded_root: Path,
    base: Path,
    tmp_path: Path,
    capsys,  # type: ignore[no-untyped-def]
    monkeypatch,  # type: ignore[no-untyped-def]
) -> tuple[Path, Path]:
    """``extract`` both runs (k = 2) and check the sharded run's store is the PEFT run's, to 1e-6.

    Returns the two workdirs (PEFT's, the sharded run's).
    """
    import numpy as np

    from nexttools.store import KINDS, open_store
    from tests.cli_helpers import invoke

    workdirs = (tmp_path / "w-peft", tmp_path / "w-sharded")
    for root, workdir in zip((peft_root, sharded_root), workdirs, strict=True):
        args = ["extract", str(root), "--base", str(base), "--workdir", str(workdir), "--k", "2"]
        code, _, err = invoke([*args, "--device", "cpu"], capsys, monkeypatch)
        assert code == 0, err
    stores = [workdir / "trajectory.h5" for workdir in workdirs]
    with open_store(stores[0]) as peft, open_store(stores[1]) as sharded:
        assert list(sharded.steps) == list(peft.steps) and sharded.modules == peft.modules
        assert list(sharded.ranks) == list(peft.ranks)
        for kind in KINDS:
            a, b = peft.read(kind), sharded.read(kind)
            for name in ("sigma", "u", "v"):
                np.testing.assert_allclose(
                    getattr(b, name), getattr(a, name), rtol=0, atol=1e-6, err_msg=f"{kind}/{name}"
                )
    return workdirs
