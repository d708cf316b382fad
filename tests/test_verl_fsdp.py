"""Current verl (≥ 0.8) LoRA checkpoints: real FSDP state dicts written by 2 gloo processes on CPU.

Each step's adapter is first saved as a plain PEFT folder; two processes then load it, shard the
model with FSDP (FSDP2 ``fully_shard``, or FSDP1 with a device mesh and ``SHARDED_STATE_DICT``, as
verl's engine does) and ``torch.save`` their ``state_dict()`` in verl's ``global_step_N/actor/``
layout, base weights included. ``extract`` must give the same store from the shards as from the PEFT
folders, and never unpickle the optimizer or ``data.pt`` files (planted with a payload here).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.demo_run import save_lora_checkpoint, save_tiny_llama
from nexttools.store import KINDS, open_store
from tests.cli_helpers import assert_one_line_error, invoke

STEPS = (10, 20, 30)
WORLD = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_config() -> object:
    from peft import LoraConfig

    # r = 3 over 2 ranks: lora_A (3, in) splits unevenly (2 + 1 rows), as FSDP2 leaves it.
    return LoraConfig(r=3, lora_alpha=12, target_modules=TARGETS, task_type="CAUSAL_LM")


class Planted:
    """A pickle that creates ``marker`` if anything ever unpickles it without ``weights_only``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.marker),))


def _write_shards(rank: int, base: str, peft_root: str, verl_root: str, version: int, port: int) -> None:
    """One FSDP rank: for every step, load the PEFT adapter, shard the model and save its state dict."""
    import torch.distributed as dist
    from peft import PeftModel
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    try:
        for step in STEPS:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            model = PeftModel.from_pretrained(model, f"{peft_root}/checkpoint-{step}")
            if version == 2:
                from torch.distributed.fsdp import fully_shard

                for layer in model.base_model.model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                state = model.state_dict()
            else:
                from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

                wrapped = FullyShardedDataParallel(model, device_mesh=mesh, use_orig_params=True)
                with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT):
                    state = wrapped.state_dict()
            actor = Path(verl_root) / f"global_step_{step}" / "actor"
            actor.mkdir(parents=True, exist_ok=True)
            torch.save(state, actor / f"model_world_size_{WORLD}_rank_{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _verl_run(tmp_path: Path, version: int) -> tuple[Path, Path, Path, Path]:
    """(base, PEFT run, verl run, marker) for FSDP ``version``."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base")
    peft_root, verl_root = tmp_path / "peft", tmp_path / "verl"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for step in STEPS:
        save_lora_checkpoint(model, _lora_config(), step, peft_root / f"checkpoint-{step}", seed=1)
    mp.spawn(
        _write_shards, args=(str(base), str(peft_root), str(verl_root), version, _free_port()), nprocs=WORLD
    )
    marker = tmp_path / "unpickled"
    for step in STEPS:
        actor = verl_root / f"global_step_{step}" / "actor"
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": version, "world_size": WORLD}))
        (actor / "lora_train_meta.json").write_text(
            json.dumps({"r": 3, "lora_alpha": 12, "task_type": "CAUSAL_LM"})
        )
        (actor / "huggingface").mkdir()
        (actor / "huggingface" / "config.json").write_text((base / "config.json").read_text())
        for rank in range(WORLD):
            for name in (
                f"optim_world_size_{WORLD}_rank_{rank}.pt",
                f"extra_state_world_size_{WORLD}_rank_{rank}.pt",
            ):
                torch.save({"state": Planted(str(marker))}, actor / name)
        torch.save({"dataloader": Planted(str(marker))}, actor.parent / "data.pt")
    (verl_root / "latest_checkpointed_iteration.txt").write_text(str(STEPS[-1]))
    return base, peft_root, verl_root, marker


FSDP1_ON_CPU = (
    "FSDP1 refuses CPU-only processes in torch 2.13 ('FSDP needs a non-CPU accelerator device'); its "
    "SHARDED_STATE_DICT with verl's device mesh holds the same Shard(0) DTensors as FSDP2's"
)


@pytest.mark.parametrize(
    "version", [2, pytest.param(1, marks=pytest.mark.skip(reason=FSDP1_ON_CPU))], ids=["fsdp2", "fsdp1"]
)
def test_verl_fsdp_shards_give_the_same_store_as_peft_folders(
    tmp_path: Path, capsys, monkeypatch, version: int
) -> None:
    base, peft_root, verl_root, marker = _verl_run(tmp_path, version)
    shard = torch.load(
        verl_root / f"global_step_{STEPS[0]}" / "actor" / "model_world_size_2_rank_0.pt",
        weights_only=True,
        mmap=True,
    )
    assert any("base_layer" in key for key in shard)  # full shards: the base weights are inside
    for root, workdir in ((peft_root, tmp_path / "w-peft"), (verl_root, tmp_path / "w-verl")):
        args = [
            "extract",
            str(root),
            "--base",
            str(base),
            "--workdir",
            str(workdir),
            "--k",
            "2",
            "--device",
            "cpu",
        ]
        code, _, err = invoke(args, capsys, monkeypatch)
        assert code == 0, err
    assert not marker.exists()
    with (
        open_store(tmp_path / "w-peft" / "trajectory.h5") as peft,
        open_store(tmp_path / "w-verl" / "trajectory.h5") as verl,
    ):
        assert list(verl.steps) == list(STEPS) and verl.modules == peft.modules
        assert list(verl.ranks) == [3] * len(verl.modules)
        for kind in KINDS:
            a, b = peft.read(kind), verl.read(kind)
            for name in ("sigma", "u", "v"):
                np.testing.assert_allclose(
                    getattr(b, name), getattr(a, name), rtol=0, atol=1e-6, err_msg=f"{kind}/{name}"
                )
    # and the jump written from the shards is the jump written from the PEFT folders
    from nexttools.checkpoints.weights import ModelWeights

    outputs = []
    for workdir in (tmp_path / "w-peft", tmp_path / "w-verl"):
        out = workdir / "out"
        common = ["--workdir", str(workdir), "--out", str(out), "--method", "last-interval", "--alpha", "1"]
        code, _, err = invoke(["extrapolate", *common, "--device", "cpu"], capsys, monkeypatch)
        assert code == 0, err
        weights = ModelWeights(out)
        outputs.append({name: weights.get(name) for name in weights.names})
    for name, tensor in outputs[0].items():
        torch.testing.assert_close(outputs[1][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_damaged_verl_checkpoints_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    base, _, verl_root, _ = _verl_run(tmp_path, 2)
    args = [
        "extract",
        str(verl_root),
        "--base",
        str(base),
        "--workdir",
        str(tmp_path / "w"),
        "--device",
        "cpu",
    ]
    actor = verl_root / f"global_step_{STEPS[-1]}" / "actor"
    (actor / "model_world_size_2_rank_1.pt").rename(tmp_path / "rank1")
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "model_world_size_2_rank_1.pt is missing")
    (tmp_path / "rank1").rename(actor / "model_world_size_2_rank_1.pt")
    (actor / "lora_train_meta.json").unlink()
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "lora_train_meta.json is missing")
