"""The model card (``README.md``) of a nexttools output, rendered from its manifest.

The card is what a person sees first on the Hub, so it says what the model is (base, run, steps,
method, α, k and what α means in steps), how well the extrapolation fitted in the back-test, how to
load it and how to resume RL training from it. Its YAML front matter is rendered with
``huggingface_hub.ModelCardData`` (no Jinja2 template, and no ``ModelCard.validate``, which would
call the public Hub whatever the endpoint) and carries the fields the Hub indexes: ``base_model``
(only when a Hub id is known: a local path would be rejected), ``base_model_relation``,
``library_name``, ``license`` (copied from the base's own card) and ``tags``.

``extrapolate`` writes the card with the output; ``push`` rewrites it with the repo id so that the
loading snippets name the repo.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData
from huggingface_hub.repocard import metadata_load

from nexttools.console import warn

CARD_NAME = "README.md"
LOCAL_PLACEHOLDER = "path/to/this/folder"
"""Where the snippets point before the output has a repo id (the card is written in a staging folder)."""
PAPER_URL = "https://arxiv.org/abs/2604.11446"

METHOD_TEXT = {
    "next": "NExt, a small MLP that predicts the next rank-1 update (σ, u, v) of every trained module "
    "from its trajectory so far",
    "linear-rank1": "AlphaRL-style baseline, the rank-1 direction of every module fitted linearly over "
    "the last k+1 checkpoints and evaluated k checkpoints ahead",
    "linear-full": "RL-Extra-style baseline, the full update of the last k checkpoints repeated",
}
BACKTEST_LABELS = {
    "next": "NExt predictor",
    "linear-rank1": "linear rank-1 (AlphaRL)",
    "linear-full": "linear full (RL-Extra)",
    "last-interval": "repeat last interval",
}
# `--token X`, `--token=X` and anything shaped like a Hugging Face token, in a recorded command line.
_TOKEN_PATTERNS = (re.compile(r"(--token[= ])\S+"), re.compile(r"\bhf_[A-Za-z0-9]{8,}\b"))


def write_model_card(folder: Path, manifest: dict, *, repo_id: str | None = None) -> Path:
    """Write ``folder/README.md`` for the output described by ``manifest`` and return its path.

    Written to a temporary file and renamed into place, so a reader never sees half a card.
    ``repo_id`` (``owner/name``) is used in the loading snippets; without it they name the folder.
    """
    folder = Path(folder)
    path = folder / CARD_NAME
    partial = folder / f".{CARD_NAME}.partial"
    partial.write_text(render_model_card(folder, manifest, repo_id=repo_id), encoding="utf-8")
    os.replace(partial, path)
    return path


def render_model_card(folder: Path, manifest: dict, *, repo_id: str | None = None) -> str:
    """The full card text: ``---`` YAML front matter ``---`` followed by the Markdown body."""
    front_matter = card_data(manifest).to_yaml()
    body = _body(Path(folder), manifest, repo_id)
    return f"---\n{front_matter}\n---\n\n{body}"


def card_data(manifest: dict) -> ModelCardData:
    """The Hub metadata of the output.

    ``base_model_relation`` is ``adapter`` for a PEFT output and ``finetune`` for merged weights (the
    Hub's ``merge`` means a merge of several models, which this is not).
    """
    base = manifest["base"]
    adapter = manifest["format"] == "adapter"
    tags = ["nexttools", "rlvr", "extrapolation", manifest["method"]]
    if adapter:
        tags.append("lora")
    license_fields = _base_license(base.get("path"))
    return ModelCardData(
        base_model=base.get("id") or None,
        base_model_relation=("adapter" if adapter else "finetune") if base.get("id") else None,
        library_name=manifest["library_name"],
        tags=tags,
        **license_fields,
    )


def scrub_secrets(text: str) -> str:
    """Replace anything that looks like an access token in ``text`` (e.g. a recorded command) by ``***``."""
    text = _TOKEN_PATTERNS[0].sub(r"\1***", text)
    return _TOKEN_PATTERNS[1].sub("***", text)


def _base_license(base_path: str | None) -> dict[str, str]:
    """``license`` (plus ``license_name``/``license_link`` for ``other``) from the base folder's README."""
    if not base_path or not (Path(base_path) / CARD_NAME).is_file():
        return {}
    try:
        metadata = metadata_load(Path(base_path) / CARD_NAME) or {}
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as error:  # costs the license only
        warn(f"could not read the license from {base_path}/{CARD_NAME}: {error}")
        return {}
    fields = {key: metadata[key] for key in ("license", "license_name", "license_link") if metadata.get(key)}
    return {key: str(value) for key, value in fields.items()}


def _body(folder: Path, manifest: dict, repo_id: str | None) -> str:
    title = repo_id.split("/")[-1] if repo_id else f"{_base_name(manifest)}, extrapolated"
    target = repo_id or LOCAL_PLACEHOLDER
    sections = [
        f"# {title}\n",
        _summary(manifest),
        _facts_table(manifest),
        _backtest_section(manifest),
        _loading_section(folder, manifest, target),
        _resume_section(manifest, target, pushed=repo_id is not None),
        _provenance_section(manifest),
    ]
    return "\n".join(section for section in sections if section)


def _steps(manifest: dict) -> list[int]:
    return [int(entry["step"]) for entry in manifest["checkpoints"]]


def _steps_ahead(manifest: dict) -> float | None:
    """How many training steps the jump α·T̂ stands for: α times the steps spanned by k checkpoints.

    T̂ predicts the change over the next k checkpoints, so with checkpoints every Δ steps the output
    sits about α·k·Δ steps past the last checkpoint. Δ is measured on the last k intervals (or all of
    them when the run is shorter); None when there is a single checkpoint.
    """
    steps, k, alpha = _steps(manifest), int(manifest["k"]), float(manifest["alpha"])
    if len(steps) > k:
        return alpha * (steps[-1] - steps[-1 - k])
    if len(steps) >= 2:
        return alpha * k * (steps[-1] - steps[0]) / (len(steps) - 1)
    return None


def _base_name(manifest: dict) -> str:
    base = manifest["base"]
    return base.get("id") or Path(base["path"]).name


def _base_link(manifest: dict) -> str:
    base = manifest["base"]
    if base.get("id"):
        return f"[{base['id']}](https://huggingface.co/{base['id']})"
    return f"`{Path(base['path']).name}` (a local model)"


def _run_name(manifest: dict) -> str:
    paths = [str(entry["path"]) for entry in manifest["checkpoints"]]
    if len(paths) == 1:
        return Path(paths[0]).parent.name
    return Path(os.path.commonpath(paths)).name


def _summary(manifest: dict) -> str:
    steps = _steps(manifest)
    alpha, k, method = float(manifest["alpha"]), int(manifest["k"]), manifest["method"]
    ahead = _steps_ahead(manifest)
    where = (
        f"so it stands at about step {steps[-1] + ahead:.0f} of the same run ({ahead:.0f} steps ahead)"
        if ahead is not None
        else f"that is, {alpha:g} × {k} checkpoints ahead"
    )
    kind = "a PEFT LoRA adapter" if manifest["format"] == "adapter" else "a full model"
    return (
        f"This is {kind} made by [nexttools](https://pypi.org/project/nexttools/): "
        f"{_base_link(manifest)} after {steps[-1]} steps of an RL run (`{_run_name(manifest)}`), "
        f"pushed further along its own weight trajectory by extrapolation ([NExt]({PAPER_URL}), "
        f"method `{method}`). Starting from the last checkpoint (step {steps[-1]}), every trained "
        f"module moved by α = {alpha:g} times its predicted update over the next k = {k} checkpoints, "
        f"{where}. Resume RL training from it to skip those steps; the back-test below says how well "
        "the extrapolation fitted this run.\n"
    )


def _facts_table(manifest: dict) -> str:
    steps = _steps(manifest)
    alpha, k = float(manifest["alpha"]), int(manifest["k"])
    ahead = _steps_ahead(manifest)
    alpha_text = f"{alpha:g}" + (f" (≈ {ahead:.0f} steps past step {steps[-1]})" if ahead is not None else "")
    k_text = f"{k} checkpoints" + (f" (≈ {ahead / alpha:.0f} steps)" if ahead is not None and alpha else "")
    output = (
        "PEFT LoRA adapter" if manifest["format"] == "adapter" else "merged Hugging Face model"
    ) + f", {manifest['dtype']}"
    method = manifest["method"]
    kind = {"lora": "LoRA ", "full": "full-weight "}.get(manifest.get("run_kind", ""), "")
    rows = [
        ("Base model", _base_link(manifest)),
        (
            "RL run",
            f"`{_run_name(manifest)}`: {len(steps)} {kind}checkpoints, steps {steps[0]} … {steps[-1]}",
        ),
        ("Method", f"`{method}`: {METHOD_TEXT.get(method, method)}"),
        ("α (extending coefficient)", alpha_text),
        ("k (horizon)", k_text),
        ("Output", output),
        ("nexttools", str(manifest.get("nexttools_version", "unknown"))),
    ]
    lines = ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join(lines) + "\n"


def _backtest_section(manifest: dict) -> str:
    backtest = manifest.get("backtest")
    header = "## Back-test\n"
    if not backtest or not backtest.get("methods"):
        reason = (
            "`linear-full` needs no predictor"
            if manifest["method"] == "linear-full"
            else "`nexttools fit` recorded none for this output"
        )
        return f"{header}\nNo back-test figures were recorded ({reason}).\n"
    # A method `fit` could not evaluate (e.g. last-interval with too few rows) is recorded as None.
    methods: dict[str, dict[str, Any]] = {
        name: figures or {} for name, figures in backtest["methods"].items()
    }
    winner = backtest.get("winner")
    intro = (
        f"\n`nexttools fit` held out the last {backtest.get('holdout_rows', '?')} trajectory rows of the "
        "run, predicted them from the earlier ones and compared: **cosine** is the cosine similarity "
        "between the predicted and the actual k-checkpoint update (1 is perfect, higher is better); "
        "**σ rel. error** is the relative error of its predicted magnitude (lower is better).\n\n"
    )
    summary = ["| Method | cosine | σ rel. error |", "|---|---:|---:|"]
    for name, figures in methods.items():
        label = BACKTEST_LABELS.get(name, name)
        label = f"**{label}** (best)" if name == winner else label
        cosine = _figure(figures.get("cosine", {}).get("overall"))
        sigma = _figure(figures.get("sigma_rel_err", {}).get("overall"))
        summary.append(f"| {label} | {cosine} | {sigma} |")
    parts = [header, intro, "\n".join(summary) + "\n"]

    module_types = [
        key for figures in methods.values() for key in figures.get("cosine", {}) if key != "overall"
    ]
    module_types = list(dict.fromkeys(module_types))
    if module_types:
        columns = list(methods)
        table = [
            "| Module | " + " | ".join(BACKTEST_LABELS.get(name, name) for name in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for module in module_types:
            cells = [_figure(methods[name].get("cosine", {}).get(module)) for name in columns]
            table.append(f"| `{module}` | " + " | ".join(cells) + " |")
        parts.append("\nCosine by module type:\n\n" + "\n".join(table) + "\n")
    if winner and winner != manifest["method"]:
        parts.append(
            f"\nNote: the back-test favoured `{winner}`, but this model was written with "
            f"`{manifest['method']}`.\n"
        )
    return "".join(parts)


def _figure(value: object) -> str:
    return f"{float(value):.3f}" if isinstance(value, (int, float)) else "–"


def _auto_class(folder: Path) -> str:
    """``AutoModelForCausalLM`` when the saved config is a causal LM (the RL case), else ``AutoModel``."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "AutoModelForCausalLM"
    architectures = config.get("architectures") or []
    if architectures and not any(str(name).endswith("ForCausalLM") for name in architectures):
        return "AutoModel"
    return "AutoModelForCausalLM"


def _base_ref(manifest: dict) -> str:
    base = manifest["base"]
    return base.get("id") or str(base["path"])


def _loading_section(folder: Path, manifest: dict, target: str) -> str:
    if manifest["format"] == "adapter":
        code = (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{_base_ref(manifest)}", dtype="auto")\n'
            f'model = PeftModel.from_pretrained(base, "{target}")\n'
            "model = model.merge_and_unload()  # optional: plain transformers model with the same weights\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{_base_ref(manifest)}")\n'
        )
        note = "The adapter gives the extrapolated weights when loaded on its base model."
    else:
        auto = _auto_class(folder)
        code = (
            f"from transformers import {auto}, AutoTokenizer\n\n"
            f'model = {auto}.from_pretrained("{target}", dtype="auto")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{target}")\n'
        )
        note = "A drop-in Hugging Face model: config, generation config, tokenizer and chat template."
    return f"## How to load\n\n{note}\n\n```python\n{code}```\n"


def _resume_section(manifest: dict, target: str, *, pushed: bool) -> str:
    last = _steps(manifest)[-1]
    ahead = _steps_ahead(manifest)
    schedule = (
        " Keep the run's hyper-parameters; if your learning-rate schedule depends on the step, continue "
        f"it from about step {last + ahead:.0f}."
        if ahead is not None
        else ""
    )
    intro = f"Use it where your trainer takes the model.{schedule}"
    lines = [f"## Resume RL training from this model\n\n{intro}\n\n"]
    if manifest["format"] == "adapter":
        base = _base_ref(manifest)
        adapter_path = f"<local copy of {target}>" if pushed else target
        lines += [
            "- **TRL** (the adapter keeps training):\n\n"
            "  ```python\n"
            "  from peft import AutoPeftModelForCausalLM\n"
            "  from trl import GRPOTrainer\n\n"
            f'  model = AutoPeftModelForCausalLM.from_pretrained("{target}", is_trainable=True)\n'
            "  trainer = GRPOTrainer(model=model, reward_funcs=..., args=..., train_dataset=...)\n"
            "  ```\n",
            f"- **verl**: `actor_rollout_ref.model.path={base} "
            f"actor_rollout_ref.model.lora_adapter_path={adapter_path}` "
            "(with the same `lora_rank`/`lora_alpha` as the run).\n",
            "- **OpenRLHF** trains from full models: merge the adapter first "
            "(`model.merge_and_unload().save_pretrained(...)`, see above) and pass that folder to "
            "`--pretrain`.\n",
        ]
    else:
        lines += [
            f'- **TRL**: `GRPOTrainer(model="{target}", reward_funcs=..., args=..., train_dataset=...)` '
            "(add a `peft_config` to train a fresh LoRA on top).\n",
            f"- **verl**: `actor_rollout_ref.model.path={target}`.\n",
            f"- **OpenRLHF**: `--pretrain {target}`.\n",
        ]
    return "".join(lines)


def _provenance_section(manifest: dict) -> str:
    lines = ["## Provenance\n"]
    command = manifest.get("command")
    if command:
        text = command if isinstance(command, str) else " ".join(str(part) for part in command)
        lines.append(f"\nMade with:\n\n```bash\n{scrub_secrets(text)}\n```\n")
    lines.append(
        "\n`nexttools.json` next to this card records every input (base, checkpoints, trajectory store, "
        "predictor) with its fingerprint, the method, α, k and the back-test figures.\n"
    )
    return "".join(lines)
