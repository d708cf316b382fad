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

import os
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData
from huggingface_hub.repocard import metadata_load

from nexttools.console import warn
from nexttools.errors import UserError
from nexttools.manifest import Manifest
from nexttools.methods import METHODS
from nexttools.outputs import get_output
from nexttools.secrets_scrub import scrub_secrets

CARD_NAME = "README.md"
LOCAL_PLACEHOLDER = "path/to/this/folder"
"""Where the snippets point before the output has a repo id (the card is written in a staging folder)."""
PAPER_URL = "https://arxiv.org/abs/2604.11446"

BACKTEST_LABELS = {
    "next": "NExt predictor",
    "last-interval": "repeat last interval",
    "rl-extra": "RL-Extra step ratio",
    "linear-rank1": "linear rank-1 (AlphaRL stand-in)",
    "factor-linear": "factor-linear",
}
KIND_TEXT = {
    "merged": "a full model",
    "adapter": "a PEFT LoRA adapter",
    "base": "a new base model for an in-place resume (the run's own last adapter goes on top of it)",
    "checkpoint": "a resumable copy of the run's last trainer checkpoint",
}


# `--token X`, `--token=X` and anything shaped like a Hugging Face token, in a recorded command line.
def write_model_card(folder: Path, manifest: Manifest, *, repo_id: str | None = None) -> Path:
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


def render_model_card(folder: Path, manifest: Manifest, *, repo_id: str | None = None) -> str:
    """The full card text: ``---`` YAML front matter ``---`` followed by the Markdown body."""
    front_matter = card_data(manifest).to_yaml()
    body = _body(Path(folder), manifest, repo_id)
    return f"---\n{front_matter}\n---\n\n{body}"


def card_data(manifest: Manifest) -> ModelCardData:
    """The Hub metadata of the output.

    ``base_model_relation`` is ``adapter`` for a PEFT output and ``finetune`` for merged weights (the
    Hub's ``merge`` means a merge of several models, which this is not).
    """
    base = manifest.base
    adapter = manifest.weights == "adapter"
    tags = ["nexttools", "rlvr", "extrapolation", manifest.method]
    if adapter:
        tags.append("lora")
    license_fields = _base_license(base.path)
    return ModelCardData(
        base_model=base.id or None,
        base_model_relation=("adapter" if adapter else "finetune") if base.id else None,
        library_name=manifest.library_name,
        tags=tags,
        license=license_fields.get("license"),
        license_name=license_fields.get("license_name"),
        license_link=license_fields.get("license_link"),
    )


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


def _body(folder: Path, manifest: Manifest, repo_id: str | None) -> str:
    title = repo_id.split("/")[-1] if repo_id else f"{manifest.base_name}, extrapolated"
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


def _steps_ahead(manifest: Manifest) -> float | None:
    """How many training steps the jump α·T̂ stands for: α times the steps spanned by k checkpoints.

    T̂ predicts the change over the next k checkpoints, so with checkpoints every Δ steps the output
    sits about α·k·Δ steps past the last checkpoint. Δ is measured on the last k intervals (or all of
    them when the run is shorter); None when there is a single checkpoint.
    """
    steps, k, alpha = manifest.steps, manifest.k, manifest.alpha
    if manifest.target_step is not None:
        return manifest.target_step - steps[-1]
    if len(steps) > k:
        return alpha * (steps[-1] - steps[-1 - k])
    if len(steps) >= 2:
        return alpha * k * (steps[-1] - steps[0]) / (len(steps) - 1)
    return None


def _base_link(manifest: Manifest) -> str:
    base = manifest.base
    if base.id:
        return f"[{base.id}](https://huggingface.co/{base.id})"
    return f"`{Path(base.path).name}` (a local model)"


def _run_name(manifest: Manifest) -> str:
    paths = [entry.path for entry in manifest.checkpoints]
    if len(paths) == 1:
        return Path(paths[0]).parent.name
    return Path(os.path.commonpath(paths)).name


def _summary(manifest: Manifest) -> str:
    steps = manifest.steps
    alpha, k, method = manifest.alpha, manifest.k, manifest.method
    ahead = _steps_ahead(manifest)
    where = (
        f"so it stands at about step {steps[-1] + ahead:.0f} of the same run ({ahead:.0f} steps ahead)"
        if ahead is not None
        else f"that is, {alpha:g} × {k} checkpoints ahead"
    )
    kind = KIND_TEXT.get(manifest.format, "a model")
    return (
        f"This is {kind} made by [nexttools](https://pypi.org/project/nexttools/): "
        f"{_base_link(manifest)} after {steps[-1]} steps of an RL run (`{_run_name(manifest)}`), "
        f"pushed further along its own weight trajectory by extrapolation ([NExt]({PAPER_URL}), "
        f"method `{method}`). Starting from the last checkpoint (step {steps[-1]}), every trained "
        f"module moved by α = {alpha:g} times its predicted update over the next k = {k} checkpoints, "
        f"{where}. Resume RL training from it to skip those steps; the back-test below says how well "
        "the extrapolation fitted this run.\n"
    )


def _facts_table(manifest: Manifest) -> str:
    steps = manifest.steps
    alpha, k = manifest.alpha, manifest.k
    ahead = _steps_ahead(manifest)
    alpha_text = f"{alpha:g}" + (f" (≈ {ahead:.0f} steps past step {steps[-1]})" if ahead is not None else "")
    k_text = f"{k} checkpoints" + (f" (≈ {ahead / alpha:.0f} steps)" if ahead is not None and alpha else "")
    output = f"`{manifest.format}`: {_output_summary(manifest.format)}, {manifest.dtype}"
    method = manifest.method
    kind = {"lora": "LoRA ", "full": "full-weight "}.get(manifest.run_kind or "", "")
    rows = [
        ("Base model", _base_link(manifest)),
        (
            "RL run",
            f"`{_run_name(manifest)}`: {len(steps)} {kind}checkpoints, steps {steps[0]} … {steps[-1]}",
        ),
        ("Method", f"`{method}`: {METHODS[method].summary if method in METHODS else method}"),
        ("α (extending coefficient)", alpha_text),
        ("k (horizon)", k_text),
        ("Output", output),
        ("nexttools", manifest.nexttools_version or "unknown"),
    ]
    lines = ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join(lines) + "\n"


def _backtest_section(manifest: Manifest) -> str:
    header = "## Back-test\n"
    parts = [header]
    if manifest.verdict is not None:
        parts.append(_verdict_text(manifest.verdict, manifest))
    backtest = manifest.backtest
    if not backtest or not backtest.get("methods"):
        method = METHODS.get(manifest.method)
        reason = (
            f"`{manifest.method}` needs no predictor"
            if method is not None and not method.needs_predictor
            else "`nexttools fit` recorded none for this output"
        )
        return "".join(parts) + f"\nNo `fit` back-test figures were recorded ({reason}).\n"
    winner = backtest.get("winner")
    skill = backtest.get("skill")
    holdout = backtest.get("holdout_rows", "?")
    if isinstance(skill, dict):
        alpha = next((f["alpha"] for f in skill.values() if f), None)
        parts.append(
            f"\n`nexttools fit` jumped from each of the last {holdout} checkpoints whose future is known, "
            "with every method as it is applied, and compared the jump with the run's actual change "
            f"over the next k checkpoints: **skill S** at α={alpha} is 1 − ‖αT̂ − T‖²/‖T‖² (1 is "
            "perfect, 0 no better than not jumping, negative harmful); **α\\*** is the α that "
            "maximises it.\n\n"
        )
        rows = ["| Method | skill S | α* |", "|---|---:|---:|"]
        for name, figures in skill.items():
            label = BACKTEST_LABELS.get(name, name)
            label = f"**{label}** (best)" if name == winner else label
            s_value = _figure((figures or {}).get("skill", {}).get("overall"))
            a_value = _figure((figures or {}).get("alpha_star", {}).get("overall"))
            rows.append(f"| {label} | {s_value} | {a_value} |")
        parts.append("\n".join(rows) + "\n")
    # A method `fit` could not evaluate (e.g. last-interval with too few rows) is recorded as None.
    methods: dict[str, dict[str, Any]] = {
        name: figures or {} for name, figures in backtest["methods"].items()
    }
    parts.append(
        f"\nRank-1 figures from the trajectory store alone (last {holdout} rows): **cosine** between "
        "the predicted and the actual rank-1 k-checkpoint update, **σ rel. error** of its magnitude. "
        "They did not predict a jump's worth in function space; S above, and `nexttools backtest`, "
        "are the figures to decide on.\n\n"
    )
    summary = ["| Method | cosine | σ rel. error |", "|---|---:|---:|"]
    for name, figures in methods.items():
        label = BACKTEST_LABELS.get(name, name)
        label = f"**{label}** (best)" if name == winner and not isinstance(skill, dict) else label
        cosine = _figure(figures.get("cosine", {}).get("overall"))
        sigma = _figure(figures.get("sigma_rel_err", {}).get("overall"))
        summary.append(f"| {label} | {cosine} | {sigma} |")
    parts.append("\n".join(summary) + "\n")
    if isinstance(skill, dict):
        parts.append(_by_module_kind("Skill S", {n: (f or {}).get("skill", {}) for n, f in skill.items()}))
    else:
        parts.append(_by_module_kind("Cosine", {n: f.get("cosine", {}) for n, f in methods.items()}))
    if winner and winner != manifest.method:
        parts.append(
            f"\nNote: the back-test favoured `{winner}`, but this model was written with "
            f"`{manifest.method}`.\n"
        )
    return "".join(parts)


def _by_module_kind(figure: str, by_method: dict[str, dict[str, Any]]) -> str:
    """One row per module kind, methods as columns; a figure a method lacks is a dash."""
    kinds = list(dict.fromkeys(k for figures in by_method.values() for k in figures if k != "overall"))
    if not kinds:
        return ""
    columns = list(by_method)
    table = [
        "| Module | " + " | ".join(BACKTEST_LABELS.get(name, name) for name in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for kind in kinds:
        cells = [_figure(by_method[name].get(kind)) for name in columns]
        table.append(f"| `{kind}` | " + " | ".join(cells) + " |")
    return f"\n{figure} by module type:\n\n" + "\n".join(table) + "\n"


def _verdict_text(verdict: dict, manifest: Manifest) -> str:
    """The ``nexttools backtest`` verdict: the recommendation and this output's own worth."""
    recommendation = verdict.get("recommendation")
    if recommendation:
        lead = (
            f"`nexttools backtest` (scored with the run's own eval from step {verdict.get('origin_step')}) "
            f"recommends `{recommendation['method']}` at α={recommendation['alpha']:g}."
        )
    else:
        lead = f"`nexttools backtest` judged: **do not extrapolate this run**. {verdict.get('reason', '')}"
    own = next(
        (
            r
            for r in verdict.get("results", [])
            if r.get("method") == manifest.method and r.get("alpha") == manifest.alpha
        ),
        None,
    )
    mine = (
        f" This output's method and α were worth {own['worth']:.2f} of the steps they claimed."
        if own and isinstance(own.get("worth"), (int, float))
        else ""
    )
    return f"\n{lead}{mine}\n"


def _figure(value: object) -> str:
    return f"{float(value):.3f}" if isinstance(value, (int, float)) else "–"


def _output_summary(name: str) -> str:
    try:
        return get_output(name).summary
    except UserError:
        return name


def _loading_section(folder: Path, manifest: Manifest, target: str) -> str:
    return f"## How to load\n\n{get_output(manifest.format).load_text(manifest, target)}"


def _resume_section(manifest: Manifest, target: str, *, pushed: bool) -> str:
    last = manifest.steps[-1]
    ahead = _steps_ahead(manifest)
    where = (
        f"The weights stand at about step {last + ahead:.0f}, {ahead:.0f} steps past the last checkpoint "
        f"(step {last}): train that many fewer steps. "
        if ahead is not None
        else ""
    )
    local = (
        f"(download it first: `hf download {target} --local-dir <dir>` where a path is needed) "
        if pushed
        else ""
    )
    return (
        f"## Resume RL training from this model\n\n{where}{local}\n\n"
        f"{get_output(manifest.format).resume_text(manifest, target)}"
    )


def _provenance_section(manifest: Manifest) -> str:
    lines = ["## Provenance\n"]
    if manifest.command:
        lines.append(f"\nMade with:\n\n```bash\n{scrub_secrets(manifest.command)}\n```\n")
    lines.append(
        "\n`nexttools.json` next to this card records every input (base, checkpoints, trajectory store, "
        "predictor) with its fingerprint, the method, α, k and the back-test figures.\n"
    )
    return "".join(lines)
