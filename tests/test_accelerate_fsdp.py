"""HF Trainer / accelerate FSDP2 sharded checkpoints (``checkpoint-N/pytorch_model_fsdp_0/``, torch DCP).

Each step's adapter is first saved as a plain PEFT folder; two gloo processes then load it, shard the
model with FSDP2 ``fully_shard`` and save it with accelerate's own ``save_fsdp_model(adapter_only=True)``
under ``SHARDED_STATE_DICT``, as the Trainer does at every checkpoint. The run folder holds the run's
``adapter_config.json`` (the DCP records no alpha). ``extract`` must give the same store as from the
PEFT folders and never unpickle the optimizer, scheduler or training-args files (planted here).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
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

    # r = 3 over 2 ranks: lora_A (3, in) splits unevenly (2 + 1 rows).
    return LoraConfig(r=3, lora_alpha=12, target_modules=TARGETS, task_type="CAUSAL_LM")


def _save_sharded(rank: int, base: str, peft_root: str, run: str, port: int) -> None:
    """One FSDP2 rank: for every step, load the PEFT adapter, shard the model, save it as the Trainer does."""
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin, save_fsdp_model
    from peft import PeftModel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    join_gloo(rank, port)
    PartialState(cpu=True)
    mesh = init_device_mesh("cpu", (WORLD,))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    try:
        for step in STEPS:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            model = PeftModel.from_pretrained(model, f"{peft_root}/checkpoint-{step}")
            for layer in model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            save_fsdp_model(plugin, None, model, f"{run}/checkpoint-{step}", adapter_only=True)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every file is written and closed by now. A worker thread that accelerate or DCP leaves behind
    # aborts the interpreter at exit now and then ("terminate called without an active exception",
    # SIGABRT, seen once in a fresh-clone CI run): leave without running the C++ destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(base, PEFT run, accelerate FSDP2 run, marker)."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("accelerate")
    base = save_tiny_llama(tmp / "base")
    peft_root, run = tmp / "peft", tmp / "run"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for step in STEPS:
        save_lora_checkpoint(model, _lora_config(), step, peft_root / f"checkpoint-{step}", seed=1)
    mp.spawn(_save_sharded, args=(str(base), str(peft_root), str(run), free_port()), nprocs=WORLD)
    marker = tmp / "unpickled"
    for step in STEPS:
        checkpoint = run / f"checkpoint-{step}"
        shutil.copy(peft_root / f"checkpoint-{step}" / "trainer_state.json", checkpoint)
        for name in ("scheduler.pt", "training_args.bin", "rng_state_0.pth"):
            torch.save({"state": Planted(str(marker))}, checkpoint / name)
        (checkpoint / "optimizer_0").mkdir()  # the optimizer's own DCP: its metadata is a plain pickle
        (checkpoint / "optimizer_0" / ".metadata").write_bytes(pickle.dumps(Planted(str(marker))))
    shutil.copy(peft_root / f"checkpoint-{STEPS[0]}" / "adapter_config.json", run)  # the user's LoraConfig
    return base, peft_root, run, marker


def _extract(run: Path, base: Path, workdir: Path, capsys, monkeypatch) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    args = [
        "extract",
        str(run),
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
    return code, err


def test_accelerate_fsdp2_checkpoints_give_the_same_store_as_peft_folders(
    fsdp_run: tuple[Path, Path, Path, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    base, peft_root, run, marker = fsdp_run
    dcp = run / f"checkpoint-{STEPS[0]}" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in dcp.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not any(run.glob("*/adapter_model.*"))  # the adapter exists only as the DCP
    workdirs = assert_extracts_like_peft(peft_root, run, base, tmp_path, capsys, monkeypatch)
    assert not marker.exists()
    with open_store(workdirs[1] / "trajectory.h5") as store:
        assert list(store.steps) == list(STEPS) and list(store.ranks) == [3] * len(store.modules)


def test_the_dcp_tensors_are_the_peft_tensors(fsdp_run: tuple[Path, Path, Path, Path]) -> None:
    from safetensors.torch import load_file

    from nexttools.checkpoints.dcp import DcpAdapter

    _, peft_root, run, _ = fsdp_run
    adapter = DcpAdapter(run / f"checkpoint-{STEPS[-1]}" / "pytorch_model_fsdp_0")
    expected = load_file(peft_root / f"checkpoint-{STEPS[-1]}" / "adapter_model.safetensors")
    assert set(adapter.shapes) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(adapter.get(key), tensor, rtol=0, atol=0, msg=key)
    assert adapter.config["lora_alpha"] == 12 and adapter.config_path == run / "adapter_config.json"


def test_damaged_accelerate_checkpoints_are_one_line(
    fsdp_run: tuple[Path, Path, Path, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    base, _, source, marker = fsdp_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    dcp = run / f"checkpoint-{STEPS[-1]}" / "pytorch_model_fsdp_0"
    workdir = tmp_path / "w"

    (run / "adapter_config.json").unlink()
    code, err = _extract(run, base, workdir, capsys, monkeypatch)
    assert_one_line_error(code, err, "records no LoRA alpha")
    shutil.copy(source / "adapter_config.json", run / f"checkpoint-{STEPS[-1]}")  # per checkpoint is read too
    (run / "adapter_config.json").write_text(json.dumps({"r": 3, "lora_alpha": 12, "peft_type": "LORA"}))

    (dcp / "__1_0.distcp").rename(tmp_path / "rank1")
    code, err = _extract(run, base, workdir, capsys, monkeypatch)
    assert_one_line_error(code, err, "__1_0.distcp is missing")
    (tmp_path / "rank1").write_bytes(b"")
    shutil.copy(tmp_path / "rank1", dcp / "__1_0.distcp")
    code, err = _extract(run, base, workdir, capsys, monkeypatch)
    assert_one_line_error(code, err, "__1_0.distcp: truncated")

    # a metadata file whose chunk lies outside its tensor is refused before any read
    shutil.copy(source / f"checkpoint-{STEPS[-1]}" / "pytorch_model_fsdp_0" / "__1_0.distcp", dcp)
    metadata = pickle.loads((dcp / ".metadata").read_bytes())  # the test's own file: trusted here
    entry = next(value for key, value in metadata.state_dict_metadata.items() if "lora_A" in key)
    entry.chunks[-1].offsets = torch.Size([entry.size[0], 0])
    (dcp / ".metadata").write_bytes(pickle.dumps(metadata))
    code, err = _extract(run, base, workdir, capsys, monkeypatch)
    assert_one_line_error(code, err, ".metadata: not a DCP metadata file of the filesystem writer")

    # a planted pickle in the DCP metadata itself is read as data, never executed, and refused
    with (dcp / ".metadata").open("wb") as stream:
        pickle.dump({"state_dict_metadata": Planted(str(marker))}, stream)
    code, err = _extract(run, base, workdir, capsys, monkeypatch)
    assert_one_line_error(code, err, ".metadata: not a DCP metadata file", "expected a Metadata")
    assert not marker.exists()
    assert not workdir.exists() or not any(workdir.glob("*.h5"))


def test_a_full_weight_dcp_is_refused_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import torch.distributed.checkpoint as dcp

    base = save_tiny_llama(tmp_path / "base")
    checkpoint = tmp_path / "run" / "checkpoint-10"
    state = {"model": {"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64)}}  # no LoRA tensor
    dcp.save(state, checkpoint_id=checkpoint / "pytorch_model_fsdp_0", no_dist=True)
    code, err = _extract(checkpoint.parent, base, tmp_path / "w", capsys, monkeypatch)
    assert_one_line_error(code, err, "holds no LoRA tensors (lora_A/lora_B); a full-weight FSDP sharded")
