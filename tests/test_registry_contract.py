"""The contract every registered method and output format keeps, on a LoRA and a full-weight run.

Parametrised over ``METHODS`` × ``OUTPUTS`` × run kind, so a newly registered method or format is
held to it with no test written (``test_a_newly_registered_method_is_collected_and_passes`` shows
it; ``test_a_method_registered_by_a_test_is_held_to_the_contract`` shows the contract catching one
that lands short of its claim):

- a combination the registry declares impossible (``lora_only`` on a full-weight run, a checkpoint
  output of a method that does not keep the rank) is refused in one line, and nothing is written;
- otherwise the jump lands on the target step, last + α·k·Δ;
- the output loads with transformers (or PEFT, for adapters), as a user would load it;
- at α = 0 it is the last checkpoint's model, to float32 rounding (an ``anchored`` method; one that
  lands on a fitted line moves onto it, less far than at α = 1);
- a ``keeps_rank`` method's checkpoint output keeps every LoRA tensor's shape, so the optimizer's
  saved moments still fit their parameters.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from examples.demo_run import DemoRun
from nexttools.errors import UserError
from nexttools.extract import ExtractOptions, extract
from nexttools.extrapolate import ExtrapolateOptions, extrapolate
from nexttools.fit import FitOptions, fit
from nexttools.methods import METHODS, Method
from nexttools.methods.last_interval import LastInterval
from nexttools.outputs import OUTPUTS

K, SPACING = 2, 10
KINDS = ("lora", "full")


def _lora_merged(base: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, checkpoint).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def runs(short_run: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per kind: the run, its base, its fitted workdir (k = 2) and the last checkpoint."""
    root = tmp_path_factory.mktemp("contract")
    full = root / "full-run"
    for step in short_run.steps:  # W_0 + ΔW of every LoRA checkpoint, whole, plus a trained norm
        folder = full / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        weights = _lora_merged(short_run.base, short_run.run / f"checkpoint-{step}")
        weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3 * step
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
        shutil.copy(short_run.base / "config.json", folder / "config.json")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    last = short_run.steps[-1]
    found = {}
    for kind, run in (("lora", short_run.run), ("full", full)):
        work = root / f"{kind}-work"
        extract(ExtractOptions(run=run, base=str(short_run.base), workdir=work, k=K))
        fit(FitOptions(workdir=work))
        found[kind] = {"base": short_run.base, "work": work, "last": run / f"checkpoint-{last}"}
    return found


def _refusal(method: Method, form: str, kind: str) -> bool:
    """Whether the registries declare the combination impossible."""
    output = OUTPUTS[form]
    lora_only = (method.lora_only or output.lora_only) and kind == "full"
    return lora_only or (form == "checkpoint" and kind == "lora" and not method.keeps_rank)


def _weights(form: str, out: Path, run: dict[str, Path], kind: str) -> dict[str, torch.Tensor]:
    """The output's model weights, loaded the way its model card says."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if form in ("merged",) or (form == "checkpoint" and kind == "full"):
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    base, adapter = (out, run["last"]) if form == "base" else (run["base"], out)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def _check_contract(method: Method, form: str, kind: str, run: dict[str, Path], tmp_path: Path) -> None:
    options = {"workdir": run["work"], "method": method.name, "format": form, "force": True}
    if _refusal(method, form, kind):
        with pytest.raises(UserError) as refused:
            extrapolate(ExtrapolateOptions(**options, alpha=1.0, out=tmp_path / "refused"))
        assert "\n" not in str(refused.value) and not (tmp_path / "refused").exists()
        return
    last_step = int(run["last"].name.split("-")[1])
    expected = (
        _lora_merged(run["base"], run["last"])
        if kind == "lora"
        else load_file(run["last"] / "model.safetensors")
    )
    moved = {}
    for alpha in (0.0, 1.0):
        out = tmp_path / f"alpha{alpha:g}"
        summary = extrapolate(ExtrapolateOptions(**options, alpha=alpha, out=out))
        target = last_step + alpha * K * SPACING
        assert summary.target_step == pytest.approx(target), f"the jump lands at {summary.target_step}"
        weights = _weights(form, out, run, kind)
        assert all(bool(torch.isfinite(w).all()) for w in weights.values())
        moved[alpha] = max(float((weights[name] - t).abs().max()) for name, t in expected.items())
    if method.anchored:
        assert moved[0.0] <= 1e-6, f"α = 0 changed the model by {moved[0.0]}"
    else:  # onto its fitted line at the last step: less far than the jump itself
        assert moved[0.0] < moved[1.0]
    assert moved[1.0] > 1e-6
    if method.keeps_rank and form == "checkpoint" and kind == "lora":
        written = load_file(tmp_path / "alpha1" / "adapter_model.safetensors")
        saved = load_file(run["last"] / "adapter_model.safetensors")
        assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in saved.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", list(OUTPUTS))
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_and_output_keep_the_contract(
    runs: dict[str, dict[str, Path]], tmp_path: Path, name: str, form: str, kind: str
) -> None:
    _check_contract(METHODS[name], form, kind, runs[kind], tmp_path)


class HalvedInterval(LastInterval):
    """A method only this test registers: half the last k-checkpoint change."""

    name = "halved-interval"
    summary = "half of last-interval"

    def jump(self, request):  # type: ignore[no-untyped-def]
        from dataclasses import replace

        return super().jump(replace(request, alpha=request.alpha / 2))


def test_a_method_registered_by_a_test_is_held_to_the_contract(
    runs: dict[str, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(METHODS, HalvedInterval.name, HalvedInterval())
    with pytest.raises(AssertionError, match="the jump lands at 90"):  # short of its claimed 100
        _check_contract(METHODS["halved-interval"], "merged", "lora", runs["lora"], tmp_path / "m")


def test_a_newly_registered_method_is_collected_and_passes() -> None:
    """A method registered before collection (by a plugin, as a new method's module would be) is
    parametrised into every combination above and keeps the contract, with no test written for it."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.registry_plugin", "-p", "no:cacheprovider", "-q",
         "-k", "repeated-interval", str(Path(__file__))],
        capture_output=True, text=True, check=False, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    assert f"{len(OUTPUTS) * len(KINDS)} passed" in done.stdout
