"""The layout registry: each stack's checkpoints written as that stack writes them, and the README table.

Every fixture saves real PEFT adapters (``PeftModel.save_pretrained``, via the demo run's
``save_lora_checkpoint``) into the folder layout of its stack, with the stack's own markers and
side files; prime-rl's keys lose PEFT's ``base_model.model.`` prefix, as prime-rl writes them.
Each run must be found with the right steps and layout, and extract to the same store as the same
adapters in TRL's layout.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from examples.demo_run import save_lora_checkpoint, save_tiny_llama
from nexttools.checkpoints.discover import LAYOUTS, discover_checkpoints
from nexttools.extract import ExtractOptions, extract
from nexttools.store import KINDS, open_store

ROOT = Path(__file__).resolve().parents[1]
STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base, trl run) of 3 PEFT checkpoints; the layouts below are made from these adapters."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("layouts")
    base = save_tiny_llama(folder / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"])
    for step in STEPS:
        save_lora_checkpoint(model, config, step, folder / "trl" / f"checkpoint-{step}", seed=2)
    return base, folder / "trl"


def _copy_adapter(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copyfile(source / name, target / name)


def _areal(trl: Path, root: Path) -> Path:
    for epoch, step in enumerate(STEPS):
        _copy_adapter(trl / f"checkpoint-{step}", root / f"epoch{epoch}epochstep{step - 1}globalstep{step}")
    return root


def _nemo_rl(trl: Path, root: Path) -> Path:
    for step in STEPS:
        _copy_adapter(trl / f"checkpoint-{step}", root / f"step_{step}" / "policy" / "weights" / "model")
        (root / f"step_{step}" / "training_info.json").write_text(json.dumps({"step": step}))
    (root / "tmp_step_40" / "policy" / "weights" / "model").mkdir(parents=True)  # still being written
    return root


def _prime_rl(trl: Path, root: Path) -> Path:
    for step in STEPS:
        folder = root / "broadcasts" / f"step_{step}"
        _copy_adapter(trl / f"checkpoint-{step}", folder)
        tensors = load_file(folder / "adapter_model.safetensors")
        stripped = {key.removeprefix("base_model.model."): t for key, t in tensors.items()}
        save_file(stripped, folder / "adapter_model.safetensors")
        (folder / "STABLE").touch()
    (root / "broadcasts" / "step_40").mkdir()  # no STABLE yet: skipped
    return root


def _ms_swift(trl: Path, root: Path) -> Path:
    run = root / "v0-20261130-101500"
    for step in STEPS:
        _copy_adapter(trl / f"checkpoint-{step}", run / f"checkpoint-{step}")
        shutil.copyfile(
            trl / f"checkpoint-{step}" / "trainer_state.json",
            run / f"checkpoint-{step}" / "trainer_state.json",
        )
    (run / "args.json").write_text("{}")
    return root


def _megatron_bridge(trl: Path, root: Path) -> Path:
    for step in STEPS:
        _copy_adapter(
            trl / f"checkpoint-{step}",
            root / f"global_step_{step}" / "actor" / "model" / "huggingface" / "adapter",
        )
    (root / "latest_checkpointed_iteration.txt").write_text(str(STEPS[-1]))
    return root


def _merger_trap(trl: Path, root: Path, base: Path) -> Path:
    """`verl.model_merger merge --target_dir global_step_N/merged`: the unmerged base plus lora_adapter/."""
    for step in STEPS:
        merged = root / f"global_step_{step}"
        shutil.copytree(base, merged)
        _copy_adapter(trl / f"checkpoint-{step}", merged / "lora_adapter")
    return root


LAYOUT_FIXTURES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "areal": (_areal, "areal"),
    "nemo-rl": (_nemo_rl, "nemo-rl"),
    "prime-rl": (_prime_rl, "prime-rl"),
    "ms-swift": (_ms_swift, "trl"),  # its run folder holds TRL-layout checkpoints
    "verl-megatron": (_megatron_bridge, "verl-megatron"),
}


def _same_store(a: Path, b: Path) -> None:
    with open_store(a) as one, open_store(b) as other:
        assert list(one.steps) == list(other.steps) and one.modules == other.modules
        for kind in KINDS:
            for name in ("sigma", "u", "v"):
                np.testing.assert_array_equal(getattr(one.read(kind), name), getattr(other.read(kind), name))


@pytest.fixture(scope="module")
def reference_store(adapters: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, trl = adapters
    workdir = tmp_path_factory.mktemp("reference")
    extract(ExtractOptions(run=trl, base=str(base), workdir=workdir, k=2, device="cpu"))
    return workdir / "trajectory.h5"


@pytest.mark.parametrize("stack", list(LAYOUT_FIXTURES))
def test_each_stack_layout_is_found_and_extracts_like_trl(
    adapters: tuple[Path, Path], reference_store: Path, tmp_path: Path, stack: str
) -> None:
    base, trl = adapters
    build, layout = LAYOUT_FIXTURES[stack]
    run = build(trl, tmp_path / stack)
    refs = discover_checkpoints(run)
    assert [ref.step for ref in refs] == list(STEPS)
    assert {ref.layout for ref in refs} == {layout} and {ref.kind for ref in refs} == {"lora"}
    extract(ExtractOptions(run=run, base=str(base), workdir=tmp_path / "work", k=2, device="cpu"))
    _same_store(tmp_path / "work" / "trajectory.h5", reference_store)


def test_the_verl_merger_trap_reads_the_adapter(
    adapters: tuple[Path, Path], reference_store: Path, tmp_path: Path, capsys
) -> None:
    base, trl = adapters
    run = _merger_trap(trl, tmp_path / "merged", base)
    refs = discover_checkpoints(run)
    assert [ref.path.name for ref in refs] == ["lora_adapter"] * 3 and {ref.kind for ref in refs} == {"lora"}
    assert "what `verl.model_merger merge` writes" in capsys.readouterr().err
    extract(ExtractOptions(run=run, base=str(base), workdir=tmp_path / "work", k=2, device="cpu"))
    _same_store(tmp_path / "work" / "trajectory.h5", reference_store)


def test_the_paper_merged_hf_model_layout(adapters: tuple[Path, Path], tmp_path: Path) -> None:
    """The NExt / RLVR-Linearity code writes a merged HF model per step in ``global_step_N/hf_model/``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, trl = adapters
    for step in STEPS:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), trl / f"checkpoint-{step}"
        )
        model.merge_and_unload().save_pretrained(tmp_path / "run" / f"global_step_{step}" / "hf_model")
        (tmp_path / "run" / f"global_step_{step}" / "actor").mkdir()
    refs = discover_checkpoints(tmp_path / "run")
    assert [ref.step for ref in refs] == list(STEPS)
    assert {ref.layout for ref in refs} == {"next-paper"} and {ref.kind for ref in refs} == {"full"}


def test_two_ms_swift_runs_in_one_folder_are_refused(adapters: tuple[Path, Path], tmp_path: Path) -> None:
    from nexttools.errors import UserError

    _, trl = adapters
    root = _ms_swift(trl, tmp_path / "out")
    shutil.copytree(root / "v0-20261130-101500", root / "v1-20261201-090000")
    with pytest.raises(UserError, match="holds 2 ms-swift runs"):
        discover_checkpoints(root)


def test_the_readme_layout_table_is_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Supported checkpoint layouts", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\| (?!trainer |---)", line)]
    assert rows == [layout.table_row for layout in LAYOUTS]
