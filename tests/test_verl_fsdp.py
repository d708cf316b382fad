"""Current verl (≥ 0.8) LoRA checkpoints: real FSDP state dicts written by 2 gloo processes on CPU.

Each step's adapter is first saved as a plain PEFT folder; two processes then load it, shard the
model with FSDP (FSDP2 ``fully_shard``, or FSDP1 with a device mesh and ``SHARDED_STATE_DICT``, as
verl's engine does) and ``torch.save`` their ``state_dict()`` in verl's ``global_step_N/actor/``
layout, base weights included. ``extract`` must give the same store from the shards as from the PEFT
folders, and never unpickle the optimizer or ``data.pt`` files (planted with a payload here).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from examples.demo_run import save_lora_checkpoint, save_tiny_llama
from nexttools.store import open_store
from tests.cli_helpers import assert_one_line_error, invoke
from tests.fsdp_helpers import WORLD, Planted, assert_extracts_like_peft, free_port, join_gloo

STEPS = (10, 20, 30)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_config() -> object:
    from peft import LoraConfig

    # r = 3 over 2 ranks: lora_A (3, in) splits unevenly (2 + 1 rows), as FSDP2 leaves it.
    return LoraConfig(r=3, lora_alpha=12, target_modules=TARGETS, task_type="CAUSAL_LM")


def _write_shards(rank: int, base: str, peft_root: str, verl_root: str, variant: str, port: int) -> None:
    """One FSDP rank: for every step, load the PEFT adapter, shard the model and save its state dict.

    ``variant``: ``fsdp1``; ``fsdp2``; ``hsdp`` (FSDP2 on a (replicate 2, shard 1) mesh, placements
    ``(Replicate(), Shard(0))``); ``lora-only`` (FSDP2, only the LoRA keys, as
    ``checkpoint.save_lora_only`` keeps them).
    """
    import torch.distributed as dist
    from peft import PeftModel
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    join_gloo(rank, port)
    if variant == "hsdp":  # verl's HSDP mesh names
        mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("ddp", "fsdp"))
    else:
        mesh = init_device_mesh("cpu", (WORLD,))
    try:
        for step in STEPS:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            model = PeftModel.from_pretrained(model, f"{peft_root}/checkpoint-{step}")
            if variant == "fsdp1":
                from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

                wrapped = FullyShardedDataParallel(model, device_mesh=mesh, use_orig_params=True)
                with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT):
                    state = wrapped.state_dict()
            else:
                from torch.distributed.fsdp import fully_shard

                for layer in model.base_model.model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                state = model.state_dict()
            if variant == "lora-only":
                state = {key: value for key, value in state.items() if "lora_" in key}
            actor = Path(verl_root) / f"global_step_{step}" / "actor"
            actor.mkdir(parents=True, exist_ok=True)
            torch.save(state, actor / f"model_world_size_{WORLD}_rank_{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _verl_run(tmp_path: Path, variant: str) -> tuple[Path, Path, Path, Path]:
    """(base, PEFT run, verl run, marker) for the FSDP ``variant`` (:func:`_write_shards`)."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base")
    peft_root, verl_root = tmp_path / "peft", tmp_path / "verl"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for step in STEPS:
        save_lora_checkpoint(model, _lora_config(), step, peft_root / f"checkpoint-{step}", seed=1)
    mp.spawn(
        _write_shards, args=(str(base), str(peft_root), str(verl_root), variant, free_port()), nprocs=WORLD
    )
    marker = tmp_path / "unpickled"
    for step in STEPS:
        actor = verl_root / f"global_step_{step}" / "actor"
        (actor / "fsdp_config.json").write_text(
            json.dumps({"FSDP_version": 1 if variant == "fsdp1" else 2, "world_size": WORLD})
        )
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
    "variant",
    ["fsdp2", "hsdp", "lora-only", pytest.param("fsdp1", marks=pytest.mark.skip(reason=FSDP1_ON_CPU))],
)
def test_verl_fsdp_shards_give_the_same_store_as_peft_folders(
    tmp_path: Path, capsys, monkeypatch, variant: str
) -> None:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    base, peft_root, verl_root, marker = _verl_run(tmp_path, variant)
    shard = torch.load(
        verl_root / f"global_step_{STEPS[0]}" / "actor" / "model_world_size_2_rank_0.pt",
        weights_only=True,
        mmap=True,
    )
    # full shards hold the base weights too; save_lora_only shards only the LoRA tensors
    assert any("base_layer" in key for key in shard) == (variant != "lora-only")
    lora_a = next(value for key, value in shard.items() if "lora_A" in key)
    assert isinstance(lora_a, DTensor)
    assert lora_a.placements == ((Replicate(), Shard(0)) if variant == "hsdp" else (Shard(0),))
    workdirs = assert_extracts_like_peft(peft_root, verl_root, base, tmp_path, capsys, monkeypatch)
    assert not marker.exists()
    with open_store(workdirs[1] / "trajectory.h5") as store:
        assert list(store.steps) == list(STEPS) and list(store.ranks) == [3] * len(store.modules)
    # and the jump written from the shards is the jump written from the PEFT folders
    from nexttools.checkpoints.weights import ModelWeights

    outputs = []
    for workdir in workdirs:
        out = workdir / "out"
        common = ["--workdir", str(workdir), "--out", str(out), "--method", "last-interval", "--alpha", "1"]
        code, _, err = invoke(["extrapolate", *common, "--device", "cpu"], capsys, monkeypatch)
        assert code == 0, err
        weights = ModelWeights(out)
        outputs.append({name: weights.get(name) for name in weights.names})
    for name, tensor in outputs[0].items():
        torch.testing.assert_close(outputs[1][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_damaged_verl_checkpoints_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    base, _, verl_root, _ = _verl_run(tmp_path, "fsdp2")
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
    (actor / "lora_train_meta.json").write_text('{"r": 4, "lora_alpha": NaN}')  # json reads NaN
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "lora_alpha nan is not a finite positive number")
    (actor / "lora_train_meta.json").write_text('{"r": 4, "lora_alpha": Infinity}')
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "lora_alpha inf is not a finite positive number")
    config = json.loads((actor / "fsdp_config.json").read_text())
    (actor / "fsdp_config.json").write_text(json.dumps({**config, "world_size": 10**9}))
    code, _, err = invoke(args, capsys, monkeypatch)  # refused before naming 10**9 files
    assert_one_line_error(code, err, "world_size 1000000000, and 2 rank files are there")
    (actor / "fsdp_config.json").write_text(json.dumps(config))
    (actor / "lora_train_meta.json").write_text(
        json.dumps({"r": 3, "lora_alpha": 12, "task_type": "CAUSAL_LM"})
    )

    # A rank file whose tensors are not what its mesh and shapes say (written by the test: trusted here).
    import torch.distributed.tensor  # DTensor as a weights-only global

    rank1 = actor / "model_world_size_2_rank_1.pt"
    original = rank1.read_bytes()
    state = torch.load(rank1, weights_only=True)
    key = next(k for k in state if "lora_A" in k)
    state[key] = "not a tensor"
    torch.save(state, rank1)
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "is not a DTensor holding a local tensor")
    state = torch.load(io.BytesIO(original), weights_only=True)
    local = state[key]._local_tensor
    state[key]._local_tensor = torch.cat([local, local])  # one more row than the global shape has
    torch.save(state, rank1)
    code, _, err = invoke(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "not its global")
    rank1.write_bytes(original)
    assert invoke(args, capsys, monkeypatch)[0] == 0
