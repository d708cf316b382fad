"""The TRL GRPO example, reduced (1 seed, α = 1.5, budget 40 steps), end to end through the nexttools CLI.

Slow (a few minutes on 2 cores) and needs the ``examples`` extra (trl); run with
``.venv-examples/bin/python -m pytest -m slow tests/test_example_trl.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
pytest.importorskip("trl")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUDGET = 40  # checkpoints every step; NExt sees steps 1..15 and resumes for 10


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from examples.trl_grpo.run import main

    out = tmp_path_factory.mktemp("trl-example")
    summary = main(["--out", str(out), "--budget", str(BUDGET), "--seeds", "0", "--alphas", "1.5"])
    return out, summary


def test_trl_writes_its_own_checkpoint_layout(example: tuple[Path, dict]) -> None:
    out, _ = example
    vanilla = out / "seed-0" / "vanilla"
    names = sorted(p.name for p in vanilla.iterdir() if p.name.startswith("checkpoint-"))
    assert names == sorted(f"checkpoint-{n}" for n in range(1, BUDGET + 1))
    last = vanilla / f"checkpoint-{BUDGET}"
    for file in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"):
        assert (last / file).is_file(), file
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == BUDGET
    config = json.loads((last / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16


def test_store_holds_only_the_prefix(example: tuple[Path, dict]) -> None:
    out, _ = example
    results = json.loads((out / "seed-0" / "results.json").read_text())
    assert results["extract"]["steps_read"] == list(range(1, 16))
    assert results["fit"]["backtest"]["winner"] in results["fit"]["backtest"]["methods"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_extrapolated_model_moved_only_lora_targets(example: tuple[Path, dict]) -> None:
    """The jump changes the 7 projections relative to the merged step-15 checkpoint and nothing else."""
    out, _ = example
    restart = _weights(out / "seed-0" / "extrapolated" / "restart")  # PEFT merge_and_unload of step 15
    jumped = _weights(out / "seed-0" / "extrapolated" / "next-a1.5")
    sft = _weights(out / "sft-model")
    assert jumped.keys() == restart.keys()
    for name, tensor in jumped.items():
        if any(target in name for target in LORA_TARGETS):
            assert not torch.equal(tensor, restart[name]), name
        else:
            assert torch.equal(tensor, sft[name]), name


def test_adapter_output_gives_the_merged_weights(example: tuple[Path, dict]) -> None:
    """The adapter output on the SFT base merges (by PEFT) to the merged output of the same α."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = example
    base = AutoModelForCausalLM.from_pretrained(out / "sft-model", dtype=torch.float32)
    merged = PeftModel.from_pretrained(
        base, out / "seed-0" / "extrapolated" / "next-a1.5-adapter"
    ).merge_and_unload()
    expected = _weights(out / "seed-0" / "extrapolated" / "next-a1.5")
    for name, tensor in merged.state_dict().items():
        if name in expected:
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)


def test_every_arm_is_measured_at_equal_steps(example: tuple[Path, dict]) -> None:
    out, summary = example
    arms = summary["arms"]
    expected = {"vanilla@250/400", "vanilla@400/400", "restart", "next-a1.5", "next-a1.5-adapter"}
    expected |= {"last-interval-a1.5", "linear-rank1-a1.5"}
    assert set(arms) == expected
    for name, row in arms.items():
        assert row["steps"] == (BUDGET if name == "vanilla@400/400" else 25)
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0
    results = json.loads((out / "seed-0" / "results.json").read_text())
    assert [s for s, _ in results["curves"]["next-a1.5"]] == list(range(15, 26))
    assert [s for s, _ in results["curves"]["vanilla"]] == list(range(0, BUDGET + 1))
    figures = out / "results"
    assert (figures / "accuracy_vs_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (figures / "curves.csv").read_text().splitlines()
    assert rows[0] == "seed,arm,step,accuracy" and len(rows) == 1 + sum(
        len(c) for c in results["curves"].values()
    )


def test_step_saving_and_icer_definitions() -> None:
    """Vanilla reaching 0.5 at step 20 gives a saving of 1 − 10/20 for an arm at 0.5 after 10 steps."""
    from examples.trl_grpo.report import icer, steps_to_match

    vanilla = [[0, 0.2], [10, 0.3], [20, 0.5], [30, 0.45], [40, 0.6]]
    assert steps_to_match(vanilla, 0.5) == 20
    assert steps_to_match(vanilla, 0.55) == 40
    assert steps_to_match(vanilla, 0.7) is None
    assert steps_to_match(vanilla, 0.1) == 10  # step 0 (the start model) never counts
    assert icer(250, 0.231, 0.191) == pytest.approx(62.5)  # the paper's Qwen2.5-7B FP row
    assert icer(250, 0.19, 0.191) is None
