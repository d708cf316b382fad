"""Checkpoint discovery across trainer layouts, step selection, refusals, and base resolution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM

from examples.demo_run import DemoRun
from nexttools.checkpoints import CheckpointRef, discover_checkpoints, resolve_base
from nexttools.errors import UserError


def place(source: Path, target: Path, *, step: int | None = None, state: bool = True) -> Path:
    """Copy a real checkpoint folder to ``target``; optionally rewrite or drop its trainer_state.json."""
    shutil.copytree(source, target)
    state_file = target / "trainer_state.json"
    if not state:
        state_file.unlink()
    elif step is not None:
        state_file.write_text(json.dumps({"global_step": step}))
    return target


def summary(refs: list[CheckpointRef], run: Path) -> list[tuple[int, str, str, str]]:
    return [(ref.step, ref.path.relative_to(run).as_posix(), ref.kind, ref.layout) for ref in refs]


def ckpt(run: DemoRun, step: int) -> Path:
    return run.run / f"checkpoint-{step}"


def test_trl_layout(short_run: DemoRun) -> None:
    refs = discover_checkpoints(short_run.run)
    assert [ref.step for ref in refs] == list(short_run.steps)
    assert all(ref.kind == "lora" and ref.layout == "trl" for ref in refs)
    assert [ref.path for ref in refs] == [ckpt(short_run, step) for step in short_run.steps]


def test_trl_steps_order_and_extras(short_run: DemoRun, tmp_path: Path) -> None:
    run = tmp_path / "run"
    place(ckpt(short_run, 10), run / "checkpoint-100", step=100)
    place(ckpt(short_run, 20), run / "checkpoint-5", step=5)
    place(ckpt(short_run, 30), run / "checkpoint-50", state=False)  # folder number is the fallback
    place(ckpt(short_run, 40), run / "checkpoint-7", step=70)  # trainer_state wins over the name
    place(ckpt(short_run, 10), run / "checkpoint-5" / "ref")  # TRL's frozen reference adapter
    place(ckpt(short_run, 10), run / "pissa_init")  # LLaMA-Factory PiSSA init adapter
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
    ):  # the final model beside the checkpoints
        shutil.copy(ckpt(short_run, 80) / name, run / name)
    refs = discover_checkpoints(run)
    assert summary(refs, run) == [
        (5, "checkpoint-5", "lora", "trl"),
        (50, "checkpoint-50", "lora", "trl"),
        (70, "checkpoint-7", "lora", "trl"),
        (100, "checkpoint-100", "lora", "trl"),
    ]


def test_bin_adapter_is_discovered(short_run: DemoRun, tmp_path: Path) -> None:
    folder = place(ckpt(short_run, 10), tmp_path / "run" / "checkpoint-10")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    assert summary(discover_checkpoints(tmp_path / "run"), tmp_path / "run") == [
        (10, "checkpoint-10", "lora", "trl")
    ]


def test_llamafactory_v1(short_run: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    for step, complete in ((10, True), (20, True), (30, False)):
        folder = run / f"checkpoint-{step}"
        place(ckpt(short_run, step), folder / "model", state=False)
        (folder / "metadata.json").write_text(json.dumps({"global_step": step * 10}))
        if complete:
            (folder / "CHECKPOINT_COMPLETE").touch()
    refs = discover_checkpoints(run)
    assert summary(refs, run) == [
        (100, "checkpoint-10/model", "lora", "llamafactory-v1"),
        (200, "checkpoint-20/model", "lora", "llamafactory-v1"),
    ]
    assert "checkpoint-30 (incomplete: no CHECKPOINT_COMPLETE marker)" in capsys.readouterr().err


def test_verl_openrlhf_and_step_folders(short_run: DemoRun, tmp_path: Path) -> None:
    verl = tmp_path / "verl"
    for step in (10, 20):
        place(ckpt(short_run, step), verl / f"global_step_{step}" / "actor" / "lora_adapter", state=False)
    (verl / "global_step_30" / "actor").mkdir(parents=True)
    (verl / "global_step_30" / "actor" / "model_world_size_2_rank_0.pt").touch()  # FSDP shards only: skipped
    (verl / "latest_checkpointed_iteration.txt").write_text("30")
    assert summary(discover_checkpoints(verl), verl) == [
        (10, "global_step_10/actor/lora_adapter", "lora", "verl"),
        (20, "global_step_20/actor/lora_adapter", "lora", "verl"),
    ]

    openrlhf = tmp_path / "openrlhf"
    for step in (30, 40):
        place(ckpt(short_run, step), openrlhf / f"global_step{step}_hf", state=False)
    (openrlhf / "_actor" / "global_step40").mkdir(parents=True)  # DeepSpeed resume state: not a checkpoint
    assert summary(discover_checkpoints(openrlhf), openrlhf) == [
        (30, "global_step30_hf", "lora", "openrlhf"),
        (40, "global_step40_hf", "lora", "openrlhf"),
    ]

    steps = tmp_path / "steps"
    for name, source in (("step_120", 10), ("step-130", 20), ("global_step140", 30), ("step150", 40)):
        place(ckpt(short_run, source), steps / name, state=False)
    assert summary(discover_checkpoints(steps), steps) == [
        (120, "step_120", "lora", "step-folder"),
        (130, "step-130", "lora", "step-folder"),
        (140, "global_step140", "lora", "step-folder"),
        (150, "step150", "lora", "step-folder"),
    ]


def test_single_adapter_folder(short_run: DemoRun, tmp_path: Path) -> None:
    assert discover_checkpoints(ckpt(short_run, 30)) == [
        CheckpointRef(30, ckpt(short_run, 30), "lora", "adapter")
    ]
    plain = place(ckpt(short_run, 30), tmp_path / "my-adapter", state=False)
    assert discover_checkpoints(plain) == [CheckpointRef(0, plain, "lora", "adapter")]


@pytest.fixture(scope="module")
def full_run(short_run: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint-N/ HF model folders: two single-file, one sharded (as full fine-tuning saves them)."""
    run = tmp_path_factory.mktemp("full") / "run"
    model = AutoModelForCausalLM.from_pretrained(short_run.base, dtype=torch.float32)
    for step in (10, 20, 30):
        folder = run / f"checkpoint-{step}"
        model.save_pretrained(folder, max_shard_size="100KB" if step == 30 else "50GB")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return run


def test_full_weight_checkpoints(full_run: Path, short_run: DemoRun) -> None:
    assert (full_run / "checkpoint-30" / "model.safetensors.index.json").is_file()
    assert summary(discover_checkpoints(full_run), full_run) == [
        (10, "checkpoint-10", "full", "trl"),
        (20, "checkpoint-20", "full", "trl"),
        (30, "checkpoint-30", "full", "trl"),
    ]
    assert discover_checkpoints(short_run.base) == [CheckpointRef(0, short_run.base, "full", "hf-model")]


def test_mixed_lora_and_full_is_refused(full_run: Path, short_run: DemoRun, tmp_path: Path) -> None:
    run = Path(shutil.copytree(full_run, tmp_path / "run"))
    place(ckpt(short_run, 40), run / "checkpoint-40")
    with pytest.raises(UserError, match=r"mixes LoRA and full-weight checkpoints \(.*checkpoint-40 is LoRA"):
        discover_checkpoints(run)
    assert [ref.step for ref in discover_checkpoints(run, steps=(None, 30))] == [10, 20, 30]


def test_step_selection(short_run: DemoRun) -> None:
    def steps(**kwargs: object) -> list[int]:
        return [ref.step for ref in discover_checkpoints(short_run.run, **kwargs)]  # type: ignore[arg-type]

    assert steps(steps=(20, 60)) == [20, 30, 40, 50, 60]
    assert steps(steps=(None, 30)) == [10, 20, 30]
    assert steps(steps=(65, None)) == [70, 80]
    assert steps(every=20) == [20, 40, 60, 80]  # step % 20 == 0, whatever the first step is
    assert steps(every=30, steps=(10, 70)) == [30, 60]
    with pytest.raises(
        UserError, match=r"no checkpoint left after selection --steps 81: \(found steps 10, 20"
    ):
        discover_checkpoints(short_run.run, steps=(81, None))
    with pytest.raises(UserError, match=r"--every must be a positive"):
        discover_checkpoints(short_run.run, every=0)
    with pytest.raises(UserError, match=r"--steps 50:20 is empty"):
        discover_checkpoints(short_run.run, steps=(50, 20))


def test_nothing_recognisable(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope: no such folder"):
        discover_checkpoints(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match=r"not a folder"):
        discover_checkpoints(tmp_path / "file.txt")
    empty = tmp_path / "run"
    (empty / "checkpoint-10").mkdir(parents=True)
    (empty / "logs").mkdir()
    with pytest.raises(UserError) as error:
        discover_checkpoints(empty)
    message = str(error.value)
    assert "no checkpoints found; looked for `checkpoint-N/`" in message and "`global_stepN_hf/`" in message
    assert "skipped: " in message and "checkpoint-10 (no adapter_model" in message and "\n" not in message


def test_duplicate_steps_and_empty_fsdp_folders_are_refused(short_run: DemoRun, tmp_path: Path) -> None:
    run = tmp_path / "run"
    place(ckpt(short_run, 10), run / "checkpoint-10")
    place(ckpt(short_run, 20), run / "step_10")
    with pytest.raises(UserError, match=r"checkpoint-10 and .*step_10 both hold step 10"):
        discover_checkpoints(run)
    fsdp = tmp_path / "fsdp" / "checkpoint-10" / "pytorch_model_fsdp_0"
    fsdp.mkdir(parents=True)  # no DCP .metadata: still being written, or not a DCP
    with pytest.raises(UserError, match=r"no checkpoints found.*skipped: .*checkpoint-10 \(no adapter"):
        discover_checkpoints(tmp_path / "fsdp")


def test_invalid_trainer_state_is_refused(short_run: DemoRun, tmp_path: Path) -> None:
    folder = place(ckpt(short_run, 10), tmp_path / "run" / "checkpoint-10")
    (folder / "trainer_state.json").write_text("{truncated")
    with pytest.raises(UserError, match=r"trainer_state\.json: not valid JSON"):
        discover_checkpoints(tmp_path / "run")
    for step in (2**64, -1, 1.5):  # beyond int64: numpy would overflow later, in a traceback
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        with pytest.raises(UserError, match=r"global_step must be an integer from 0 to 2\*\*62"):
            discover_checkpoints(tmp_path / "run")


def test_a_step_beyond_int64_in_a_folder_name_is_skipped(short_run: DemoRun, tmp_path: Path) -> None:
    place(ckpt(short_run, 10), tmp_path / "run" / "checkpoint-10")
    place(ckpt(short_run, 20), tmp_path / "run" / f"checkpoint-{2**64}", state=False)
    assert [ref.step for ref in discover_checkpoints(tmp_path / "run")] == [10]


# --- resolve_base ---------------------------------------------------------------------------------


def test_resolve_local_base(short_run: DemoRun, tmp_path: Path) -> None:
    assert resolve_base(str(short_run.base)) == short_run.base.resolve()
    with pytest.raises(UserError, match=r"no such folder"):
        resolve_base(str(tmp_path / "missing"))
    with pytest.raises(UserError, match=r"no such folder"):
        resolve_base("./models/base")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"not a folder"):
        resolve_base(str(tmp_path / "file"))


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_offline_not_cached(offline_cache: Path) -> None:
    """A mistyped relative folder (``demo/base``) looks like a Hub id: both readings are reported."""
    with pytest.raises(
        UserError, match=r"--base acme/tiny-base: not a Hub id in the huggingface_hub cache.*no local folder"
    ):
        resolve_base("acme/tiny-base")
    with pytest.raises(UserError, match=r"no local folder not a valid id! exists"):
        resolve_base("not a valid id!")


def test_hub_id_resolved_from_cache_offline(offline_cache: Path, short_run: DemoRun) -> None:
    """A Hub id already in the huggingface_hub cache resolves offline to its snapshot folder."""
    repo = offline_cache / "models--acme--tiny-base"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(short_run.base, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    resolved = resolve_base("acme/tiny-base")
    assert resolved == snapshot.resolve() or resolved.resolve() == snapshot.resolve()
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"has no safetensors weights; no local folder"):
        resolve_base("acme/tiny-base")
