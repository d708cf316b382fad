"""Repeated in-place jumps in a real HF Trainer LoRA run (nexttools.schedule): the schedule, the
jump against ``extrapolate --format checkpoint``, the optimizer, the resume, the gate, and the store
of a run that jumped (one trajectory: every global delta against the dense W_i − W_0)."""

from __future__ import annotations

import copy
import json
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
        learning_rate=1e-3,
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
    """A 10-step run jumping (factor-linear, α 1) at steps 4 and 8, probed around each jump."""
    root = tmp_path_factory.mktemp("jumped")
    before, after = Probe(), Probe()
    callback = JumpCallback(root / "work", every=4, start=4, alpha=1.0, base=str(base))
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


def _remade(run: Path, base: Path, work: Path, k: int, method: str, alpha: float, form: str) -> Path:
    """A jump remade offline from ``run`` as it stood: ``extract`` then ``extrapolate``; its output."""
    extract(ExtractOptions(run=run, base=str(base), workdir=work, k=k))
    out = work.parent / "out"
    extrapolate(
        ExtrapolateOptions(workdir=work, method=method, alpha=alpha, format=form, out=out, force=True)
    )
    return out


def test_the_run_jumps_on_schedule_and_records_it(jumped: dict[str, Any]) -> None:
    entries = read_jumps(jumped["root"] / "work")
    assert [(e.step, e.method, e.alpha, e.kept) for e in entries] == [
        (4, "factor-linear", 1.0, True),
        (8, "factor-linear", 1.0, True),
    ]
    assert all(e.claimed_steps == pytest.approx(1.0 * 5 * 2) for e in entries[1:])  # α·k·Δ, Δ = 2
    logged = [row for row in jumped["trainer"].state.log_history if "jump/step" in row]
    assert [row["jump/step"] for row in logged] == [4.0, 8.0]
    with open_store(jumped["root"] / "work" / "trajectory.h5") as store:  # the store of the jump at 8
        assert [int(s) for s, j in zip(store.steps, store.jumped, strict=True) if j] == [4]


@pytest.mark.parametrize("step", [4, 8])
def test_a_live_jump_equals_the_checkpoint_output(
    jumped: dict[str, Any], base: Path, tmp_path: Path, step: int
) -> None:
    run = _pre_jump_run(jumped, step, tmp_path / "run")
    out = _remade(run, base, tmp_path / "work", 5, "factor-linear", 1.0, "checkpoint")
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
            _assert_global_row(store, row, merged.merge_and_unload().state_dict(), w0)


def _assert_global_row(
    store: Any, row: int, weights: dict[str, torch.Tensor], w0: dict[str, torch.Tensor]
) -> None:
    """The store's global triple of every module at ``row`` is the top one of the dense W − W_0."""
    glob = store.read("global")
    for j, name in enumerate(store.modules):
        u_ref, s_ref, _ = torch.linalg.svd((weights[name] - w0[name]).double())
        where = (int(store.steps[row]), name)
        assert float(glob.sigma[row, j]) == pytest.approx(float(s_ref[0]), rel=1e-5, abs=1e-5), where
        u = torch.from_numpy(glob.u[row, store.u_offset[j] : store.u_offset[j + 1]]).double()
        assert abs(float(u @ u_ref[:, 0])) == pytest.approx(1.0, abs=1e-5), where


def test_what_a_live_jump_refuses(base: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="every must be a positive integer"):
        JumpCallback(tmp_path, every=0, start=4)
    with pytest.raises(UserError, match="unknown method"):
        JumpCallback(tmp_path, every=4, start=4, method="bogus")
    trainer = _trainer(base, tmp_path / "run2", 4, [])
    JumpCallback(tmp_path / "work2", every=3, start=4, base=str(base)).attach(trainer)
    with pytest.raises(UserError, match="multiples of save_steps"):
        trainer.train()


class BaseProbe(TrainerCallback):
    """The live merged weight W = base_layer.weight + s·B·A of every LoRA module, and its frozen base
    weight, at every save (PEFT's own ``get_delta_weight``)."""

    def __init__(self) -> None:
        self.merged: dict[int, dict[str, torch.Tensor]] = {}
        self.base: dict[int, dict[str, torch.Tensor]] = {}

    def on_save(self, args, state, control, model=None, **kwargs) -> None:
        merged, base = {}, {}
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                key = name.removeprefix("base_model.model.") + ".weight"
                weight = module.base_layer.weight.detach().clone()
                base[key] = weight
                merged[key] = weight + module.get_delta_weight("default").detach()
        self.merged[state.global_step], self.base[state.global_step] = merged, base


@pytest.fixture(scope="module")
def folded(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 10-step run whose jumps (last-interval, α 1) at steps 4 and 8 are folded into its base."""
    root = tmp_path_factory.mktemp("folded")
    before, after = BaseProbe(), BaseProbe()
    callback = JumpCallback(
        root / "work", every=4, start=4, method="last-interval", alpha=1.0, k=1, base=str(base)
    )
    trainer = _trainer(base, root / "run", 10, [before])
    callback.attach(trainer)
    trainer.add_callback(after)
    trainer.train()
    return {"root": root, "before": before, "after": after}


def test_a_folded_jump_moves_the_base_as_the_base_output_does(
    folded: dict[str, Any], base: Path, tmp_path: Path
) -> None:
    work = folded["root"] / "work"
    entries = read_jumps(work)
    assert [(e.step, e.method, e.kept, e.base_shift) for e in entries] == [
        (4, "last-interval", True, True),
        (8, "last-interval", True, True),
    ]
    for step in (4, 8):
        assert (work / "jumps" / f"step-{step}" / "base-shift.safetensors").is_file()
    # The jump at 8, remade offline from the run as it stood then: its base output is the live base.
    run = tmp_path / "run"
    for step in (2, 4, 6, 8):
        shutil.copytree(folded["root"] / "run" / f"checkpoint-{step}", run / f"checkpoint-{step}")
    offline = tmp_path / "work"
    offline.mkdir()
    shutil.copytree(work / "jumps", offline / "jumps")
    record = json.loads((work / "jumps.json").read_text())
    record["jumps"] = [entry for entry in record["jumps"] if entry["step"] == 4]
    (offline / "jumps.json").write_text(json.dumps(record))
    out = _remade(run, base, offline, 1, "last-interval", 1.0, "base")
    written = load_file(out / "model.safetensors")
    live, pre = folded["after"].base[8], folded["before"].base[8]
    for name, tensor in live.items():
        torch.testing.assert_close(tensor, written[name], rtol=0, atol=1e-5, msg=name)
        assert not torch.equal(tensor, pre[name])  # it did move
    with pytest.raises(UserError, match="folded jumps into its frozen base"):
        extrapolate(
            ExtrapolateOptions(
                workdir=offline, method="factor-linear", alpha=1.0, format="checkpoint", out=tmp_path / "c"
            )
        )


def test_a_run_whose_jumps_were_folded_is_one_trajectory(
    folded: dict[str, Any], jumped: dict[str, Any], base: Path
) -> None:
    """Every global delta of the folded run is the dense live W_i − W_0 (shifts + s·B_i A_i), and the
    rows before the first jump are those of a run that never jumped."""
    work = folded["root"] / "work"
    extract(ExtractOptions(run=folded["root"] / "run", base=str(base), workdir=work, k=1))
    w0 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    plain = jumped["root"] / "work" / "trajectory.h5"  # the factor-linear run: the same steps 0-4
    with open_store(work / "trajectory.h5") as store, open_store(plain) as ref:
        assert [int(s) for s in store.steps] == [2, 4, 6, 8, 10]
        assert [int(s) for s, j in zip(store.steps, store.jumped, strict=True) if j] == [4, 8]
        assert store.shift_steps == (4, 8)
        glob, ref_glob = store.read("global"), ref.read("global")
        assert torch.equal(torch.from_numpy(glob.sigma[0]), torch.from_numpy(ref_glob.sigma[0]))
        for row, step in enumerate(store.steps):
            _assert_global_row(store, row, folded["after"].merged[int(step)], w0)


def test_every_output_of_a_folded_run_is_the_same_model(
    folded: dict[str, Any], base: Path, tmp_path: Path
) -> None:
    """merged = the adapter output on W_0 = the run's last checkpoint on the base output (PEFT's merge)."""
    work = folded["root"] / "work"
    extract(ExtractOptions(run=folded["root"] / "run", base=str(base), workdir=work, k=1))
    outputs = {}
    for form in ("merged", "adapter", "base"):
        outputs[form] = tmp_path / form
        extrapolate(
            ExtrapolateOptions(
                workdir=work, method="last-interval", alpha=1.0, format=form, out=outputs[form], force=True
            )
        )
    merged = AutoModelForCausalLM.from_pretrained(outputs["merged"], dtype=torch.float32).state_dict()
    on_w0 = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), outputs["adapter"]
    ).merge_and_unload()
    on_new_base = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(outputs["base"], dtype=torch.float32),
        folded["root"] / "run" / "checkpoint-10",
    ).merge_and_unload()
    live = folded["after"].merged[10]
    for other in (on_w0.state_dict(), on_new_base.state_dict()):
        for name, tensor in merged.items():
            torch.testing.assert_close(other[name], tensor, rtol=0, atol=2e-5, msg=name)
    for name in live:  # the jump is on top of the live weights at 10, not of the adapter alone
        assert not torch.allclose(merged[name], live[name], atol=1e-6)


def test_a_resumed_run_folds_its_kept_shifts_again(base: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first, probe = _trainer(base, tmp_path / "run", 6, []), BaseProbe()
    JumpCallback(work, every=4, start=4, method="rl-extra", alpha=1.0, k=1, base=str(base)).attach(first)
    first.add_callback(probe)
    first.train()
    second, resumed = _trainer(base, tmp_path / "run", 8, []), BaseProbe()
    JumpCallback(work, every=4, start=4, method="rl-extra", alpha=1.0, k=1, base=str(base)).attach(second)
    second.callback_handler.callbacks.insert(0, resumed)  # before the callback's jump at 8
    second.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert [(e.step, e.base_shift) for e in read_jumps(work)] == [(4, True), (8, True)]
    for name, tensor in probe.base[6].items():  # the base the first run trained on after its jump
        torch.testing.assert_close(resumed.base[8][name], tensor, rtol=0, atol=0, msg=name)


def test_a_next_schedule_refits_its_predictor_at_every_jump(base: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    trainer = _trainer(base, tmp_path / "run", 10, [])
    JumpCallback(work, every=4, start=6, method="next", alpha=1.0, k=1, base=str(base)).attach(trainer)
    trainer.train()
    assert [(e.step, e.method, e.base_shift) for e in read_jumps(work)] == [
        (6, "next", True),
        (10, "next", True),
    ]
    config = json.loads((work / "predictor.json").read_text())
    with open_store(work / "trajectory.h5") as store:
        assert [int(s) for s in store.steps] == [2, 4, 6, 8, 10] and store.shift_steps == (6,)
        assert config["store_fingerprint"] == store.fingerprint()  # trained on the store it jumped from


def test_the_offline_loop_with_recorded_base_jumps_is_one_trajectory(base: Path, tmp_path: Path) -> None:
    """Train, extract, `extrapolate --format base --record`, resume the run's own checkpoint on that
    base, extract again: every global delta is the dense live W_i − W_0, the jump is marked in the
    interval after it, and the next base output keeps the first shift."""
    run, work = tmp_path / "run", tmp_path / "work"
    _trainer(base, run, 6, []).train()
    extract(ExtractOptions(run=run, base=str(base), workdir=work, k=1))
    with open_store(work / "trajectory.h5") as store:
        before = store.read("global")
    first = tmp_path / "base-1"
    options = {"workdir": work, "method": "last-interval", "alpha": 1.0, "format": "base", "force": True}
    extrapolate(ExtrapolateOptions(**options, out=first, record=True))
    (entry,) = read_jumps(work)
    assert (entry.step, entry.base_shift, entry.in_checkpoint) == (6, True, False)

    probe = BaseProbe()
    resumed = _trainer(first, run, 10, [probe])
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-6"))
    extract(ExtractOptions(run=run, base=str(base), workdir=work, k=1))
    w0 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    with open_store(work / "trajectory.h5") as store:
        assert [int(s) for s in store.steps] == [2, 4, 6, 8, 10]
        assert [int(s) for s, j in zip(store.steps, store.jumped, strict=True) if j] == [8]
        assert store.shift_steps == (7,)
        glob = store.read("global")
        assert torch.equal(torch.from_numpy(glob.sigma[:3]), torch.from_numpy(before.sigma))
        for row, step in ((3, 8), (4, 10)):
            _assert_global_row(store, row, probe.merged[step], w0)

    second, merged = tmp_path / "base-2", tmp_path / "merged"
    extrapolate(ExtrapolateOptions(**options, out=second, record=True))
    extrapolate(ExtrapolateOptions(**{**options, "format": "merged"}, out=merged))
    assert [(e.step, e.in_checkpoint) for e in read_jumps(work)] == [(6, False), (10, False)]
    on_second = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(second, dtype=torch.float32), run / "checkpoint-10"
    ).merge_and_unload()
    expected = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
    for name, tensor in on_second.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=2e-5, msg=name)
    with pytest.raises(UserError, match="--record is for an output the run resumes from"):
        extrapolate(ExtrapolateOptions(**{**options, "format": "merged"}, out=tmp_path / "m2", record=True))


def test_a_jump_too_large_is_not_made_and_the_run_goes_on(base: Path, tmp_path: Path) -> None:
    before, after = Probe(), Probe()
    trainer = _trainer(base, tmp_path / "run", 6, [before])
    JumpCallback(tmp_path / "work", every=4, start=4, alpha=1000.0, base=str(base)).attach(trainer)
    trainer.add_callback(after)
    trainer.train()
    (entry,) = read_jumps(tmp_path / "work")
    assert not entry.kept and entry.refused is not None and "its own weight norm" in entry.refused
    for name, tensor in before.lora[4].items():
        assert torch.equal(tensor, after.lora[4][name]), name  # nothing moved
    assert trainer.state.global_step == 6


SCORE_SCRIPT = """
import sys
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, {root!r})
from tests.test_jump_callback import score_of

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print("loading done")
print(score_of(model))
"""


def score_of(model: torch.nn.Module) -> float:
    """Minus the loss of ``model`` on a fixed batch: what the test's eval command prints."""
    rows = Tokens(16).rows
    batch = {"input_ids": rows, "labels": rows}
    with torch.no_grad():
        return -float(model(**batch).loss)


def test_the_merged_state_of_a_live_model_is_peft_s_merge(base: Path) -> None:
    from nexttools.schedule.gates import merged_state_dict

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():  # the trained copy of a modules_to_save module differs from the original
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # the live model was only read


def test_an_eval_command_gates_the_jump(base: Path, tmp_path: Path) -> None:
    import sys

    from nexttools.schedule.gates import EvalCommandGate

    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT.format(root=str(Path(__file__).resolve().parent.parent)))
    seen: dict[int, float] = {}

    class Before(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs) -> None:
            seen[state.global_step] = score_of(model)

    trainer = _trainer(base, tmp_path / "run", 4, [Before()])
    gate = EvalCommandGate(f"{sys.executable} {script} {{model}}")
    JumpCallback(tmp_path / "work", every=4, start=4, alpha=1.0, base=str(base), gate=gate).attach(trainer)
    trainer.train()
    (entry,) = read_jumps(tmp_path / "work")
    assert entry.score_before == pytest.approx(seen[4], abs=1e-5)  # the live model, scored out of process
    assert entry.score_after is not None and entry.kept == (entry.score_after >= entry.score_before)
