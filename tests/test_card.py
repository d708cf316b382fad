"""The model card: Hub front matter, a body that tells the output's story, snippets that really load it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from safetensors.torch import load_file

from examples.demo_run import DemoRun
from nexttools.card import LOCAL_PLACEHOLDER, render_model_card, write_model_card
from nexttools.manifest import Manifest
from tests.conftest import copy_tree

BACKTEST = {
    "holdout_rows": 3,
    "methods": {
        "next": {
            "cosine": {"overall": 0.9312, "q_proj": 0.91, "down_proj": 0.95},
            "sigma_rel_err": {"overall": 0.0487},
        },
        "linear-rank1": {
            "cosine": {"overall": 0.8123, "q_proj": 0.70, "down_proj": 0.88},
            "sigma_rel_err": {"overall": 0.2},
        },
        "last-interval": {"cosine": {"overall": 0.7}, "sigma_rel_err": {"overall": 0.31}},
    },
    "winner": "next",
}


def make_manifest(
    run: DemoRun,
    *,
    base_id: str | None = "my-org/tiny-llama",
    output_format: str = "merged",
    method: str = "next",
    alpha: float = 1.5,
    k: int = 5,
    steps: tuple[int, ...] | None = None,
    backtest: dict[str, Any] | None = BACKTEST,
    command: str = "nexttools extrapolate --alpha 1.5",
    lora: dict[str, Any] | None = None,
) -> Manifest:
    """A manifest with the fields `extrapolate` records (the `files` list is added by `write_manifest`),
    read back as `verify_output` reads one."""
    steps = run.steps if steps is None else steps
    document = {
        "nexttools_version": "0.1.0",
        "command": command,
        "method": method,
        "alpha": alpha,
        "k": k,
        "format": output_format,
        "run_kind": "lora",
        "dtype": "float32",
        "library_name": "peft" if output_format == "adapter" else "transformers",
        "base": {"path": str(run.base), "id": base_id, "fingerprint": "base-fp"},
        "checkpoints": [
            {"step": step, "path": str(run.run / f"checkpoint-{step}"), "fingerprint": f"fp{step}"}
            for step in steps
        ],
        "store": {"path": "nexttools-run/trajectory.h5", "fingerprint": "store-fp"},
        "predictor": None,
        "backtest": backtest,
        "lora": lora,
    }
    return Manifest.from_json(document, Path("nexttools.json"))


def loading_code(card: str) -> str:
    """The Python block of the card's "How to load" section."""
    section = card.split("## How to load", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    return code


@pytest.fixture
def base_with_license(short_run: DemoRun, tmp_path: Path) -> DemoRun:
    """The demo run with a copy of its base that has a model card of its own (license: other + name/link)."""
    base = copy_tree(short_run.base, tmp_path / "base")
    (base / "README.md").write_text(
        "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n"
        "tags:\n- base-tag\n---\n# Base\n"
    )
    return DemoRun(base=base, run=short_run.run, steps=short_run.steps)


def test_front_matter_of_a_merged_output(base_with_license: DemoRun, tmp_path: Path) -> None:
    manifest = make_manifest(base_with_license, method="linear-rank1")
    path = write_model_card(tmp_path, manifest, repo_id="my-org/tiny-grpo-next")

    assert path == tmp_path / "README.md"
    metadata = metadata_load(path)
    assert metadata == {
        "base_model": "my-org/tiny-llama",
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "license": "other",
        "license_name": "tiny-license",
        "license_link": "LICENSE",
        "tags": ["nexttools", "rlvr", "extrapolation", "linear-rank1"],
    }
    # huggingface_hub's own card parser reads the same metadata (no network involved).
    card = ModelCard(path.read_text())
    assert card.data.base_model == "my-org/tiny-llama"
    assert card.data.library_name == "transformers"


def test_front_matter_of_an_adapter_on_a_local_base(short_run: DemoRun, tmp_path: Path) -> None:
    """No Hub id: no base_model (a local path would be rejected); the demo base has no card: no license."""
    assert not (short_run.base / "README.md").exists()
    manifest = make_manifest(short_run, base_id=None, output_format="adapter")
    metadata = metadata_load(write_model_card(tmp_path, manifest))

    assert metadata == {
        "library_name": "peft",
        "tags": ["nexttools", "rlvr", "extrapolation", "next", "lora"],
    }


def test_adapter_relation_with_a_hub_base(short_run: DemoRun, tmp_path: Path) -> None:
    manifest = make_manifest(short_run, output_format="adapter")
    metadata = metadata_load(write_model_card(tmp_path, manifest))
    assert metadata["base_model"] == "my-org/tiny-llama"
    assert metadata["base_model_relation"] == "adapter"


def test_body_says_what_alpha_means_in_steps(short_run: DemoRun, tmp_path: Path) -> None:
    manifest = make_manifest(short_run, alpha=1.5, k=5)
    card = render_model_card(tmp_path, manifest, repo_id="my-org/tiny-grpo-next")

    steps = short_run.steps
    ahead = 1.5 * (steps[-1] - steps[-1 - 5])  # α times the steps spanned by the last k checkpoints
    assert f"after {steps[-1]} steps of an RL run (`{short_run.run.name}`)" in card
    assert f"about step {steps[-1] + ahead:.0f} of the same run ({ahead:.0f} steps ahead)" in card
    assert f"| α (extending coefficient) | 1.5 (≈ {ahead:.0f} steps past step {steps[-1]}) |" in card
    assert f"| k (horizon) | 5 checkpoints (≈ {ahead / 1.5:.0f} steps) |" in card
    assert f"{len(steps)} LoRA checkpoints, steps {steps[0]} … {steps[-1]}" in card
    assert card.startswith("---\n") and "\n# tiny-grpo-next\n" in card


def test_short_run_measures_the_spacing_over_all_checkpoints(short_run: DemoRun, tmp_path: Path) -> None:
    """With fewer than k+1 checkpoints the jump is α·k times the mean spacing."""
    manifest = make_manifest(short_run, steps=(10, 30, 50), k=5, alpha=2.0)
    card = render_model_card(tmp_path, manifest)
    ahead = 2.0 * 5 * (50 - 10) / 2
    assert f"about step {50 + ahead:.0f} of the same run" in card


def test_backtest_tables(short_run: DemoRun, tmp_path: Path) -> None:
    card = render_model_card(tmp_path, make_manifest(short_run))
    section = card.split("## Back-test", 1)[1].split("\n## ", 1)[0]

    assert "Rank-1 figures from the trajectory store alone (last 3 rows)" in section
    assert "| **NExt predictor** (best) | 0.931 | 0.049 |" in section
    assert "| linear rank-1 (AlphaRL stand-in) | 0.812 | 0.200 |" in section
    assert "| repeat last interval | 0.700 | 0.310 |" in section
    # Per module type, methods as columns; a figure a method lacks is a dash, never a made-up number.
    assert "| Module | NExt predictor | linear rank-1 (AlphaRL stand-in) | repeat last interval |" in section
    assert "| `q_proj` | 0.910 | 0.700 | – |" in section
    assert "| `down_proj` | 0.950 | 0.880 | – |" in section
    assert "favoured" not in section


def test_skill_leads_the_backtest_section(short_run: DemoRun, tmp_path: Path) -> None:
    skill = {
        "next": {"alpha": 1.5, "skill": {"q_proj": 0.5, "overall": 0.61}, "alpha_star": {"overall": 1.04}},
        "last-interval": None,
        "linear-rank1": {
            "alpha": 1.5,
            "skill": {"q_proj": -0.2, "overall": -0.1},
            "alpha_star": {"overall": 0.3},
        },
    }
    card = render_model_card(tmp_path, make_manifest(short_run, backtest={**BACKTEST, "skill": skill}))
    section = card.split("## Back-test", 1)[1].split("\n## ", 1)[0]
    assert "**skill S** at α=1.5" in section
    assert "| **NExt predictor** (best) | 0.610 | 1.040 |" in section
    assert "| repeat last interval | – | – |" in section  # not scored: a dash, never a made-up number
    assert "| NExt predictor | 0.931 | 0.049 |" in section  # the rank-1 figures follow, unmarked
    assert "Skill S by module type" in section and "| `q_proj` | 0.500 | – | -0.200 |" in section
    assert section.index("skill S") < section.index("Rank-1 figures")


def test_backtest_winner_other_than_the_method_is_pointed_out(short_run: DemoRun, tmp_path: Path) -> None:
    backtest = {**BACKTEST, "winner": "linear-rank1"}
    card = render_model_card(tmp_path, make_manifest(short_run, backtest=backtest))
    assert "| **linear rank-1 (AlphaRL stand-in)** (best) |" in card
    assert "the back-test favoured `linear-rank1`, but this model was written with `next`" in card


def test_no_backtest(short_run: DemoRun, tmp_path: Path) -> None:
    card = render_model_card(tmp_path, make_manifest(short_run, method="last-interval", backtest=None))
    assert "No `fit` back-test figures were recorded (`last-interval` needs no predictor)." in card
    assert "| Method | cosine |" not in card


def test_resume_instructions(short_run: DemoRun, tmp_path: Path) -> None:
    """Every format's card carries the recipe of its own resume route in TRL, verl and OpenRLHF."""
    merged = render_model_card(tmp_path, make_manifest(short_run), repo_id="my-org/out")
    assert 'GRPOTrainer(model="my-org/out", peft_config=LoraConfig(' in merged
    assert 'model_init_kwargs={"dtype": "float32"}' in merged
    assert "actor_rollout_ref.model.path=my-org/out" in merged
    assert "--actor.model_name_or_path my-org/out --ds.lora.rank" in merged
    assert "--pretrain" not in merged  # removed from OpenRLHF in April 2026

    adapter = render_model_card(
        tmp_path, make_manifest(short_run, output_format="adapter"), repo_id="my-org/ad"
    )
    assert 'PeftModel.from_pretrained(base, "my-org/ad", is_trainable=True)' in adapter
    assert "actor_rollout_ref.model.path=my-org/tiny-llama" in adapter
    assert "actor_rollout_ref.model.lora_adapter_path=my-org/ad" in adapter
    assert "actor_rollout_ref.model.lora_rank=" in adapter

    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    manifest = make_manifest(short_run, output_format="base", lora=lora)
    last = str(short_run.run / f"checkpoint-{short_run.steps[-1]}")
    base = render_model_card(tmp_path, manifest, repo_id="my-org/nb")
    assert "LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])" in base
    assert f'trainer.train(resume_from_checkpoint="{last}")' in base
    assert "the KL anchor moves" in base and "no verified in-place resume" in base
    assert "OpenRLHF**: has no option to continue" in base

    checkpoint = render_model_card(tmp_path, make_manifest(short_run, output_format="checkpoint"))
    assert 'trainer.train(resume_from_checkpoint="path/to/this/folder")' in checkpoint


def test_a_token_in_the_recorded_command_never_reaches_the_card(short_run: DemoRun, tmp_path: Path) -> None:
    secret = "hf_" + "Ab3" * 12
    command = f"nexttools extrapolate --alpha 1.5 --push-to-hub o/r --token {secret} --token={secret}"
    card = render_model_card(tmp_path, make_manifest(short_run, command=command))
    assert secret not in card
    assert "nexttools extrapolate --alpha 1.5 --push-to-hub o/r --token *** --token=***" in card


def test_rewrite_replaces_the_card_atomically(short_run: DemoRun, tmp_path: Path) -> None:
    manifest = make_manifest(short_run)
    write_model_card(tmp_path, manifest)
    assert f'from_pretrained("{LOCAL_PLACEHOLDER}"' in (tmp_path / "README.md").read_text()
    write_model_card(tmp_path, manifest, repo_id="my-org/out")
    assert (tmp_path / "README.md").read_text() == render_model_card(tmp_path, manifest, repo_id="my-org/out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md"]


def test_merged_loading_snippet_loads_the_model(short_run: DemoRun, tmp_path: Path) -> None:
    """The card's Python block, pointed at the folder, loads the model and its tokenizer with transformers."""
    output = copy_tree(short_run.base, tmp_path / "out")
    write_model_card(output, make_manifest(short_run))
    code = loading_code((output / "README.md").read_text())
    namespace: dict[str, Any] = {}
    exec(code.replace(LOCAL_PLACEHOLDER, str(output)), namespace)

    model, tokenizer = namespace["model"], namespace["tokenizer"]
    assert type(model).__name__ == "LlamaForCausalLM"
    saved = load_file(output / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    assert tokenizer("hi").input_ids  # the folder's tokenizer, loaded by the snippet


def test_adapter_loading_snippet_applies_the_adapter(short_run: DemoRun, tmp_path: Path) -> None:
    """The adapter snippet loads the base named in the manifest, applies the adapter and merges it."""
    output = copy_tree(short_run.run / f"checkpoint-{short_run.steps[-1]}", tmp_path / "adapter-out")
    write_model_card(output, make_manifest(short_run, base_id=None, output_format="adapter"))
    code = loading_code((output / "README.md").read_text())
    assert f'from_pretrained("{short_run.base}"' in code
    namespace: dict[str, Any] = {}
    exec(code.replace(LOCAL_PLACEHOLDER, str(output)), namespace)

    merged = namespace["model"].state_dict()
    base = load_file(short_run.base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[name], base[name])  # the LoRA delta was applied
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_card_does_not_depend_on_the_staging_folder(short_run: DemoRun, tmp_path: Path) -> None:
    """`extrapolate` writes the card inside a hidden staging folder that is renamed afterwards."""
    manifest = make_manifest(short_run, output_format="adapter")
    staging, final = tmp_path / ".out.partial-123", tmp_path / "out"
    staging.mkdir()
    final.mkdir()
    card = render_model_card(staging, manifest)
    assert card == render_model_card(final, manifest)
    assert "partial" not in card and "\n# tiny-llama, extrapolated\n" not in card
    assert "\n# my-org/tiny-llama, extrapolated\n" in card
