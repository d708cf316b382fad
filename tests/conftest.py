"""Shared fixtures: tiny models and real PEFT runs built locally (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch is imported: the tests' matrices are tiny, and on a busy 2-core machine torch's
# default thread pool makes them ~100x slower. CLI subprocesses inherit these.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from examples.demo_run import DemoRun, build_demo_run


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """A 15-checkpoint TRL-layout LoRA run (steps 10..150) on a tiny fp32 Llama. Read-only: copy to modify."""
    return build_demo_run(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """An 8-checkpoint run (steps 10..80), enough for k=5 with 3 target rows. Read-only."""
    return build_demo_run(tmp_path_factory.mktemp("short"), steps=tuple(range(10, 81, 10)))


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a run or model folder so that a test may modify it."""
    import shutil

    shutil.copytree(src, dst)
    return dst
