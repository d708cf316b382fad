"""Repeated in-place jumps in a real HF Trainer LoRA run (nexttools.schedule): the schedule, the
jump against ``extrapolate --format checkpoint``, the optimizer, the resume, the gate, and the store
of a run that jumped (one trajectory: every global delta against the dense W_i − W_0)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from examples.demo_run import save_tiny_llama
from nexttools.errors import UserError
from nexttools.extract import ExtractOptions, extract
from nexttools.extrapolate import ExtrapolateOptions, extrapolate
from nexttools.jump_record import read_jumps
from nexttools.schedule.callback import JumpCallback
from nexttools.schedule.live import lora_parameters
from nexttools.store import open_store

VOCAB, SEQ = 64, 16


class Tokens(torch.utils.data.Dataset):
    """Random token sequences with a learnable rule (the next token is the previous + 1)."""

    def __init__(self, count: int = 256) -> None:
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, VOCAB, (count, 1), generator=generator)
        self.rows = (starts + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class Probe(TrainerCallback):
    """Snapshots of the LoRA parameters and the optimizer state at every save (before or after the
    callbacks registered between two probes)."""

    def __init__(self) -> None:
        self.lora: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, list[dict[str, Any]]] = {}
        self.rng: dict[int, torch.Tensor] = {}

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        self.lora[state.global_step] = {
            f"{name}.{side}": tensor.detach().clone()
            for name, pair in lora_parameters(model).items()
            for side, tensor in zip("AB", pair, strict=True)
        }
        self.optimizer[state.global_step] = copy.deepcopy(list(optimizer.state.values()))
        self.rng[state.global_step] = torch.get_rng_state()


def _trainer(base: Path, out: Path, steps: int, callbacks: list[TrainerCallback]) -> Trainer:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        save_steps=2,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("jump") / "base", hidden_size=32, intermediate_size=48)


@pytest.fixture(scope="module")
def jumped(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 10-step run jumping (factor-linear, α 1.5) at steps 4 and 8, probed around each jump."""
    root = tmp_path_factory.mktemp("jumped")
    before, after = Probe(), Probe()
    callback = JumpCallback(root / "work", every=4, start=4, alpha=1.5, base=str(base))
    trainer = _trainer(base, root / "run", 10, [before])
    callback.attach(trainer)
    trainer.add_callback(after)
    trainer.train()
    return {"root": root, "before": before, "after": after, "trainer": trainer}


def _pre_jump_run(jumped: dict[str, Any], step: int, out: Path) -> Path:
    """The run as the jump at ``step`` saw it: checkpoints up to ``step``, that one as saved (pre-jump)."""
    run = jumped["root"] / "run"
    for checkpoint in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        if int(checkpoint.name.split("-")[1]) <= step:
            shutil.copytree(checkpoint, out / checkpoint.name)
    kept = jumped["root"] / "work" / "jumps" / f"step-{step}" / "adapter_model.safetensors"
    shutil.copyfile(kept, out / f"checkpoint-{step}" / "adapter_model.safetensors")
    return out


def test_the_run_jumps_on_schedule_and_records_it(jumped: dict[str, Any]) -> None:
    entries = read_jumps(jumped["root"] / "work")
    assert [(e.step, e.method, e.alpha, e.kept) for e in entries] == [
        (4, "factor-linear", 1.5, True),
        (8, "factor-linear", 1.5, True),
    ]
    assert all(e.claimed_steps == pytest.approx(1.5 * 5 * 2) for e in entries[1:])  # α·k·Δ, Δ = 2
    logged = [row for row in jumped["trainer"].state.log_history if "jump/step" in row]
    assert [row["jump/step"] for row in logged] == [4.0, 8.0]
    with open_store(jumped["root"] / "work" / "trajectory.h5") as store:  # the store of the jump at 8
        assert [int(s) for s, j in zip(store.steps, store.jumped, strict=True) if j] == [4]


@pytest.mark.parametrize("step", [4, 8])
def test_a_live_jump_equals_the_checkpoint_output(
    jumped: dict[str, Any], base: Path, tmp_path: Path, step: int
) -> None:
    run = _pre_jump_run(jumped, step, tmp_path / "run")
    work = tmp_path / "work"
    extract(ExtractOptions(run=run, base=str(base), workdir=work, k=5))
    out = tmp_path / "out"
    extrapolate(
        ExtrapolateOptions(
            workdir=work, method="factor-linear", alpha=1.5, format="checkpoint", out=out, force=True
        )
    )
    written = load_file(out / "adapter_model.safetensors")
    live = jumped["after"].lora[step]
    assert live.keys() and len(written) == len(live)
    for name, tensor in live.items():
        module, side = name.rsplit(".", 1)
        key = "base_model.model." + module.removesuffix(".weight") + f".lora_{side}.weight"
        torch.testing.assert_close(tensor, written[key], rtol=0, atol=1e-5, msg=name)
    assert not torch.equal(live[name], jumped["before"].lora[step][name])  # it did move


def test_the_optimizer_state_is_unchanged_by_a_jump(jumped: dict[str, Any]) -> None:
    for step in (4, 8):
        before, after = jumped["before"].optimizer[step], jumped["after"].optimizer[step]
        assert len(before) == len(after) > 0
        for old, new in zip(before, after, strict=True):
            assert old.keys() == new.keys()
            for key in old:
                assert torch.equal(torch.as_tensor(old[key]), torch.as_tensor(new[key])), key


def test_the_checkpoint_holds_the_jump_and_a_resume_jumps_again(base: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = _trainer(base, tmp_path / "run", 6, [])
    JumpCallback(work, every=4, start=4, base=str(base)).attach(first)
    first.train()
    assert [e.step for e in read_jumps(work)] == [4]
    saved = load_file(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors")
    kept = load_file(work / "jumps" / "step-4" / "adapter_model.safetensors")
    assert saved.keys() == kept.keys() and any(not torch.equal(saved[k], kept[k]) for k in saved)

    probe = Probe()
    second = _trainer(base, tmp_path / "run", 10, [])
    JumpCallback(work, every=4, start=4, base=str(base)).attach(second)
    second.add_callback(probe)
    second.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert [e.step for e in read_jumps(work)] == [4, 8]
    assert 8 in probe.lora and 4 not in probe.lora


def test_the_gate_reverts_a_jump_that_lowers_the_score(base: Path, tmp_path: Path) -> None:
    scores = iter([1.0, 0.5])  # before, after: the jump hurt

    def gate(model: torch.nn.Module) -> float:
        torch.manual_seed(12345)  # a gate that samples and seeds, as an eval does
        torch.rand(3)
        return next(scores)

    probe = Probe()
    trainer = _trainer(base, tmp_path / "run", 4, [])
    JumpCallback(tmp_path / "work", every=4, start=4, base=str(base), gate=gate).attach(trainer)
    trainer.add_callback(probe)
    before = Probe()
    trainer.callback_handler.callbacks.insert(0, before)
    trainer.train()
    (entry,) = read_jumps(tmp_path / "work")
    assert not entry.kept and (entry.score_before, entry.score_after) == (1.0, 0.5)
    for name, tensor in before.lora[4].items():
        assert torch.equal(tensor, probe.lora[4][name]), name  # reverted bit for bit
    assert not (tmp_path / "work" / "jumps").exists()
    assert torch.equal(before.rng[4], probe.rng[4])  # the gate's seeding did not touch the run's stream


def test_a_run_that_jumped_twice_is_one_trajectory(
    jumped: dict[str, Any], base: Path, tmp_path: Path
) -> None:
    """Extract the whole jumped run: each global delta is the dense W_i − W_0 of its checkpoint."""
    work = jumped["root"] / "work"
    extract(ExtractOptions(run=jumped["root"] / "run", base=str(base), workdir=work, k=5))
    plain = tmp_path / "plain"
    _trainer(base, plain / "run", 10, []).train()  # the same run without jumps (same LR schedule)
    extract(ExtractOptions(run=plain / "run", base=str(base), workdir=plain / "work", k=5, steps=(None, 2)))
    w0 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    with open_store(work / "trajectory.h5") as store, open_store(plain / "work" / "trajectory.h5") as ref:
        assert [int(s) for s in store.steps] == [2, 4, 6, 8, 10]
        assert [int(s) for s, j in zip(store.steps, store.jumped, strict=True) if j] == [4, 8]
        glob, ref_glob = store.read("global"), ref.read("global")
        assert torch.equal(torch.from_numpy(glob.sigma[0]), torch.from_numpy(ref_glob.sigma[0]))
        for row, step in enumerate(store.steps):
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            merged = PeftModel.from_pretrained(model, jumped["root"] / "run" / f"checkpoint-{step}")
            weights = merged.merge_and_unload().state_dict()
            for j, name in enumerate(store.modules):
                dense = (weights[name] - w0[name]).double()
                u_ref, s_ref, _ = torch.linalg.svd(dense)
                sigma = float(glob.sigma[row, j])
                assert sigma == pytest.approx(float(s_ref[0]), rel=1e-5, abs=1e-5), (step, name)
                u = torch.from_numpy(glob.u[row, store.u_offset[j] : store.u_offset[j + 1]]).double()
                assert abs(float(u @ u_ref[:, 0])) == pytest.approx(1.0, abs=1e-5), (step, name)


def test_what_a_live_jump_refuses(base: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="every must be a positive integer"):
        JumpCallback(tmp_path, every=0, start=4)
    with pytest.raises(UserError, match="unknown method"):
        JumpCallback(tmp_path, every=4, start=4, method="bogus")
    trainer = _trainer(base, tmp_path / "run", 4, [])
    JumpCallback(tmp_path / "work", every=4, start=4, method="next", base=str(base)).attach(trainer)
    with pytest.raises(UserError, match="must keep the adapter's rank"):
        trainer.train()
    trainer = _trainer(base, tmp_path / "run2", 4, [])
    JumpCallback(tmp_path / "work2", every=3, start=4, base=str(base)).attach(trainer)
    with pytest.raises(UserError, match="multiples of save_steps"):
        trainer.train()
