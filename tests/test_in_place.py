"""In-place resume: ``--format base`` and ``--format checkpoint`` against a real HF Trainer run.

The runs here are trained by ``transformers.Trainer`` itself (TRL's GRPOTrainer is a Trainer and
resumes through the same ``resume_from_checkpoint`` code), so every checkpoint holds what a real run
leaves: the adapter (or the model), ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and
``trainer_state.json``. A resumed Trainer must see, at its first step, the merged output's function
and the run's own optimizer state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from examples.demo_run import save_tiny_llama
from nexttools.extract import ExtractOptions, extract
from nexttools.extrapolate import ExtrapolateOptions, extrapolate
from nexttools.manifest import verify_output
from tests.cli_helpers import invoke

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQUENCE = 12


def _lora_config() -> object:
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")


def _dataset(count: int = 64) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 99, (count, SEQUENCE), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _arguments(out: Path, max_steps: int) -> object:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_only_model=False,
    )


class FirstStep:
    """A Trainer callback that records, at the first step after resuming, the model's logits on a fixed
    input, the global step and a copy of the optimizer's state."""

    def __init__(self) -> None:
        self.logits: torch.Tensor | None = None
        self.optimizer_state: dict | None = None
        self.step: int | None = None

    def callback(self) -> object:
        from transformers import TrainerCallback

        recorder = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
                if recorder.logits is None:
                    with torch.no_grad():
                        recorder.logits = model(PROBE).logits.detach().clone()
                    recorder.optimizer_state = {
                        index: {key: value.clone() for key, value in entry.items()}
                        for index, entry in optimizer.state_dict()["state"].items()
                    }
                    recorder.step = state.global_step

        return _Callback()


PROBE = torch.arange(4, 4 + SEQUENCE)[None, :]


@dataclass(frozen=True)
class TrainedRun:
    base: Path
    run: Path
    last: Path


def _train(folder: Path, *, lora: bool) -> TrainedRun:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer

    base = save_tiny_llama(folder / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if lora:
        model = get_peft_model(model, _lora_config())
    Trainer(model=model, args=_arguments(folder / "run", 6), train_dataset=_dataset()).train()
    return TrainedRun(base, folder / "run", folder / "run" / "checkpoint-6")


def _resume(model: torch.nn.Module, checkpoint: Path, out: Path) -> FirstStep:
    from transformers import Trainer

    recorder = FirstStep()
    trainer = Trainer(
        model=model, args=_arguments(out, 7), train_dataset=_dataset(), callbacks=[recorder.callback()]
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return recorder


def _peft_model(base: Path) -> torch.nn.Module:
    """A fresh LoRA of the run's own config on the model in ``base``, as the user's script builds it."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    return get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), _lora_config())


def _check_first_step(first: FirstStep, run_checkpoint: Path, reference: Path) -> None:
    """The resumed Trainer's first step: the run's step counter and optimizer, the reference's function."""
    assert first.step == 6  # the run's own trainer state: step counter, schedule, data position
    _assert_same_optimizer_state(first.optimizer_state, _saved_optimizer_state(run_checkpoint))
    assert first.logits is not None
    torch.testing.assert_close(first.logits, _logits(reference), rtol=0, atol=2e-5)


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROBE).logits


def _saved_optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)["state"]


def _assert_same_optimizer_state(recorded: dict | None, saved: dict) -> None:
    assert recorded is not None and set(recorded) == set(saved) and saved
    for index, entry in saved.items():
        for key, value in entry.items():
            assert torch.equal(recorded[index][key], value), (index, key)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    folder = tmp_path_factory.mktemp("lora-trainer")
    run = _train(folder, lora=True)
    extract(ExtractOptions(run=run.run, base=str(run.base), workdir=folder / "work", k=2, device="cpu"))
    return run


def _options(run: TrainedRun, out: Path, **changes: object) -> ExtrapolateOptions:
    fields: dict = {
        "workdir": run.run.parent / "work",
        "out": out,
        "device": "cpu",
        "alpha": 1.5,
        "method": "next",
        "format": "merged",
    }
    return ExtrapolateOptions(**(fields | changes))


def test_resume_in_place_from_the_new_base_continues_the_runs_own_state(
    lora_run: TrainedRun, tmp_path: Path
) -> None:
    new_base, merged = tmp_path / "base", tmp_path / "merged"
    extrapolate(_options(lora_run, new_base, method="last-interval", format="base"))
    extrapolate(_options(lora_run, merged, method="last-interval"))
    assert verify_output(new_base).format == "base"

    first = _resume(_peft_model(new_base), lora_run.last, tmp_path / "resumed")
    _check_first_step(first, lora_run.last, merged)
    # The jump is real: without it the same resume computes another function.
    without = _resume(_peft_model(lora_run.base), lora_run.last, tmp_path / "control")
    assert without.logits is not None and first.logits is not None
    assert (without.logits - first.logits).abs().max() > 1e-3


def test_factor_linear_checkpoint_resumes_with_the_jumped_adapter(
    lora_run: TrainedRun, tmp_path: Path
) -> None:
    out, merged = tmp_path / "checkpoint", tmp_path / "merged"
    extrapolate(_options(lora_run, out, method="factor-linear", format="checkpoint"))
    extrapolate(_options(lora_run, merged, method="factor-linear"))
    kept = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "adapter_config.json")
    for name in kept:
        assert (out / name).read_bytes() == (lora_run.last / name).read_bytes(), name
    assert verify_output(out).weights == "adapter"

    first = _resume(_peft_model(lora_run.base), out, tmp_path / "resumed")
    _check_first_step(first, lora_run.last, merged)


def test_full_weight_checkpoint_resumes_with_the_jumped_weights(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = _train(tmp_path / "full", lora=False)
    workdir = tmp_path / "work"
    extract(ExtractOptions(run=run.run, base=str(run.base), workdir=workdir, k=2, device="cpu"))
    out, merged = tmp_path / "checkpoint", tmp_path / "merged"
    for output_format, folder in (("checkpoint", out), ("merged", merged)):
        extrapolate(
            ExtrapolateOptions(
                workdir=workdir, out=folder, method="rl-extra", format=output_format, device="cpu", alpha=1.0
            )
        )
    assert (out / "optimizer.pt").read_bytes() == (run.last / "optimizer.pt").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(run.base, dtype=torch.float32)
    _check_first_step(_resume(model, out, tmp_path / "resumed"), run.last, merged)


def test_combinations_that_cannot_resume_in_place_are_refused(
    lora_run: TrainedRun, tmp_path: Path, monkeypatch, capsys
) -> None:
    workdir = str(lora_run.run.parent / "work")
    common = ["extrapolate", "--workdir", workdir, "--device", "cpu", "--out", str(tmp_path / "x")]
    for extra, message in (
        (["--format", "checkpoint", "--method", "last-interval"], "use --format base"),
        (["--format", "checkpoint", "--method", "factor-linear", "--dtype", "bfloat16"], "drop --dtype"),
    ):
        code, _, err = invoke([*common, *extra], capsys, monkeypatch)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_the_card_gives_the_in_place_recipe(lora_run: TrainedRun, tmp_path: Path) -> None:
    out = tmp_path / "base"
    extrapolate(_options(lora_run, out, method="last-interval", format="base"))
    card = (out / "README.md").read_text()
    manifest = json.loads((out / "nexttools.json").read_text())
    assert manifest["lora"]["target_modules"] and manifest["resume_from"] == str(lora_run.last)
    assert f'trainer.train(resume_from_checkpoint="{lora_run.last}")' in card
    assert "lora_alpha=12" in card and "q_proj" in card
