"""``--format base`` against PEFT, and the methods' formulas against dense computations.

The contract of the in-place output: the run's own last adapter, merged by PEFT onto the new base,
gives the ``--format merged`` weights, and every tensor that is not a trained module is the base's,
byte for byte. Checked on the TRL-layout demo run, an rsLoRA run with rank/alpha patterns, and a
GPT-2 (Conv1D, ``fan_in_fan_out``) run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.demo_run import build_demo_run, save_lora_checkpoint
from nexttools.checkpoints.weights import ModelWeights
from nexttools.extract import ExtractOptions, extract
from nexttools.extrapolate import ExtrapolateOptions, extrapolate
from nexttools.methods import METHODS
from nexttools.store import open_store

STEPS = (10, 20, 30)
K = 2


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    weights = ModelWeights(folder)
    return {name: weights.get(name) for name in weights.names}


def _custom_run(folder: Path, kind: str) -> tuple[Path, Path]:
    """(base, run) of a 3-checkpoint run: rsLoRA with rank/alpha patterns on Llama, or GPT-2 Conv1D."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from examples.demo_run import save_tiny_llama

    base = folder / "base"
    if kind == "gpt2":
        GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
        ).save_pretrained(base)
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
        )
    else:
        save_tiny_llama(base)
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
            rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
            alpha_pattern={"v_proj": 40},
        )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for step in STEPS:
        save_lora_checkpoint(model, config, step, folder / "run" / f"checkpoint-{step}", seed=3)
    return base, folder / "run"


@pytest.fixture(scope="module", params=["trl", "rslora-patterns", "gpt2-fan-in-fan-out"])
def small_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """(base, run, workdir) of an extracted 3-checkpoint run (k = 2) of each fixture kind."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "trl":
        built = build_demo_run(folder, steps=STEPS)
        base, run = built.base, built.run
    else:
        base, run = _custom_run(folder, "gpt2" if request.param.startswith("gpt2") else "llama")
    extract(ExtractOptions(run=run, base=str(base), workdir=folder / "work", k=K, device="cpu"))
    return base, run, folder / "work"


def _write(workdir: Path, out: Path, **fields: object) -> Path:
    fields = {"format": "merged", "alpha": 1.5, "method": "next", "force": True} | fields
    extrapolate(ExtrapolateOptions(workdir=workdir, out=out, device="cpu", **fields))  # type: ignore[arg-type]
    return out


def _peft_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: t.detach().clone() for name, t in merged.state_dict().items()}


@pytest.mark.parametrize("method", [name for name, m in METHODS.items() if not m.needs_predictor])
def test_the_last_adapter_on_the_new_base_is_the_merged_output(
    small_run: tuple[Path, Path, Path], method: str, tmp_path: Path
) -> None:
    base, run, workdir = small_run
    merged = _tensors(_write(workdir, tmp_path / "merged", method=method, alpha=1.5))
    new_base = _write(workdir, tmp_path / "base", method=method, alpha=1.5, format="base")
    written, original = _tensors(new_base), _tensors(base)
    with open_store(workdir / "trajectory.h5") as store:
        modules = set(store.modules)
    assert set(written) == set(original)
    for name in set(original) - modules:  # norms, embeddings, lm_head: the base's own bytes
        assert torch.equal(written[name], original[name]), name
    moved = [name for name in modules if not torch.equal(written[name], original[name])]
    assert len(moved) == len(modules)  # the jump is folded into every trained module

    resumed = _peft_merge(new_base, run / f"checkpoint-{STEPS[-1]}")
    for name, tensor in merged.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=3e-6, msg=name)


def test_bf16_new_base_differs_from_the_merged_output_only_by_its_own_rounding(tmp_path: Path) -> None:
    built = build_demo_run(tmp_path / "bf16", steps=STEPS, base_dtype=torch.bfloat16)
    workdir = tmp_path / "work"
    extract(ExtractOptions(run=built.run, workdir=workdir, k=K, device="cpu"))
    new_base = _write(workdir, tmp_path / "base", method="last-interval", alpha=1.0, format="base")
    merged_fp32 = _tensors(
        _write(workdir, tmp_path / "m32", method="last-interval", alpha=1.0, dtype="float32")
    )
    written = _tensors(new_base)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    resumed = _peft_merge(new_base, built.run / f"checkpoint-{STEPS[-1]}")  # fp32 adapter on the bf16 W0'
    with open_store(workdir / "trajectory.h5") as store:
        for name in store.modules:
            # exact = fp32 merged; resumed = round(W0') + s·B·A: off by at most half a bf16 ulp of W0'
            error = (resumed[name] - merged_fp32[name]).abs()
            bound = 2.0**-8 * written[name].float().abs() + 1e-6
            assert bool((error <= bound).all()), name


def test_rl_extra_and_factor_linear_match_their_formulas(tmp_path: Path) -> None:
    """rl-extra: Ŵ = W0 + (t/s_c)·ΔW_c with t = s_c + α·k·Δ. factor-linear: A', B' are the least-squares
    lines through the last k+1 checkpoints' factors, evaluated at t (numpy's polyfit as the reference)."""
    from safetensors.torch import load_file

    built = build_demo_run(tmp_path / "run", steps=(10, 20, 40))
    workdir = tmp_path / "work"
    extract(ExtractOptions(run=built.run, workdir=workdir, k=K, device="cpu"))
    alpha, spacing = 1.5, (40 - 10) / 2
    target = 40 + alpha * K * spacing

    merged = _tensors(_write(workdir, tmp_path / "rl-extra", method="rl-extra", alpha=alpha))
    last = _peft_merge(built.base, built.run / "checkpoint-40")
    base = _tensors(built.base)
    with open_store(workdir / "trajectory.h5") as store:
        modules = list(store.modules)
    for name in modules:
        delta = last[name].double() - base[name].double()
        expected = base[name].double() + (target / 40) * delta
        torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=2e-6, msg=name)

    adapter = _write(workdir, tmp_path / "factor", method="factor-linear", alpha=alpha, format="adapter")
    written = load_file(adapter / "adapter_model.safetensors")
    stored = [load_file(built.run / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (10, 20, 40)]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["rank_pattern"].values()) == {8}  # the adapter's own rank
    for key, tensor in written.items():
        series = np.stack([s[key].double().numpy().reshape(-1) for s in stored])
        slope, intercept = np.polyfit(np.array([10.0, 20.0, 40.0]), series, 1)
        expected = torch.from_numpy(slope * target + intercept).reshape(tensor.shape).float()
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7, msg=key)


def test_adapter_declares_its_real_rank_at_the_top_level(tmp_path: Path) -> None:
    built = build_demo_run(tmp_path / "run", steps=STEPS)
    workdir = tmp_path / "work"
    extract(ExtractOptions(run=built.run, workdir=workdir, k=K, device="cpu"))
    adapter = _write(workdir, tmp_path / "a", method="linear-rank1", alpha=1.0, format="adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 9 and config["lora_alpha"] == pytest.approx(18.0)  # scaling 16/8 kept at rank 9
    assert set(config["rank_pattern"].values()) == {9}
    assert json.loads((adapter / "nexttools.json").read_text())["adapter_rank"] == 9


def test_alpha_zero_adapter_is_the_runs_own_last_adapter(tmp_path: Path) -> None:
    """What the verl route in the README relies on: α = 0 writes the last checkpoint's adapter unchanged."""
    from safetensors.torch import load_file

    built = build_demo_run(tmp_path / "run", steps=STEPS)
    workdir = tmp_path / "work"
    extract(ExtractOptions(run=built.run, workdir=workdir, k=K, device="cpu"))
    adapter = _write(workdir, tmp_path / "own", method="rl-extra", alpha=0.0, format="adapter")
    written = load_file(adapter / "adapter_model.safetensors")
    original = load_file(built.run / f"checkpoint-{STEPS[-1]}" / "adapter_model.safetensors")
    assert set(written) == set(original) and all(torch.equal(written[k], original[k]) for k in original)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
