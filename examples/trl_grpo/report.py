"""Step 5's figures: accuracy at equal steps, step saving, ICER, back-test, across seeds; CSV, JSON, plot.

Definitions (all accuracies are greedy exact match on the held-out set, in [0, 1]):

- **accuracy at equal steps**: every extrapolated arm ends at 250/400·S RL steps; compared with
  vanilla at the same 250/400·S steps and at the full budget S.
- **vanilla steps to match**: the first vanilla checkpoint whose accuracy is >= the arm's final
  accuracy (same seed); ``None`` when vanilla never gets there within S.
- **step saving**: ``1 − (250/400·S) / vanilla steps to match`` (the paper's 37.5% is 250 against
  400); negative when vanilla got there sooner; ``None`` when vanilla never matched.
- **ICER** (paper §5.1): ``RL steps / improvement``, the improvement in accuracy points (%) over the
  SFT start model; lower is better; ``None`` when there is no improvement.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path


def _at(curve: list[list[float]], step: int) -> float:
    """Accuracy of ``curve`` at exactly ``step`` (a checkpoint step)."""
    for s, acc in curve:
        if s == step:
            return acc
    raise KeyError(f"no evaluation at step {step}")


def steps_to_match(vanilla: list[list[float]], target: float) -> int | None:
    """First vanilla step (> 0) whose accuracy reaches ``target``; None when it never does."""
    for step, acc in vanilla:
        if step > 0 and acc >= target:
            return int(step)
    return None


def icer(steps: int, accuracy: float, start_accuracy: float) -> float | None:
    """Paper's ICER: steps per accuracy point gained over the start model; None without a gain."""
    gain = 100.0 * (accuracy - start_accuracy)
    return steps / gain if gain > 0 else None


def seed_metrics(doc: dict) -> dict[str, dict]:
    """Per-arm figures of one seed's results document (see :func:`examples.trl_grpo.protocol.run_seed`)."""
    budget = doc["budget"]
    every = budget // 40
    prefix, end = 15 * every, 25 * every
    vanilla = doc["curves"]["vanilla"]
    sft = doc["sft_accuracy"]
    rows: dict[str, dict] = {
        "vanilla@250/400": {"steps": end, "accuracy": _at(vanilla, end), "after_jump": None},
        "vanilla@400/400": {"steps": budget, "accuracy": _at(vanilla, budget), "after_jump": None},
    }
    for name, curve in doc["curves"].items():
        if name == "vanilla":
            continue
        rows[name] = {"steps": end, "accuracy": _at(curve, end), "after_jump": _at(curve, prefix)}
    for name, row in rows.items():
        row["icer"] = icer(row["steps"], row["accuracy"], sft)
        if name.startswith("vanilla"):  # matching vanilla against itself says nothing
            row["vanilla_steps_to_match"] = row["step_saving"] = None
            continue
        match = steps_to_match(vanilla, row["accuracy"])
        row["vanilla_steps_to_match"] = match
        row["step_saving"] = None if match is None else 1.0 - row["steps"] / match
    return rows


def _mean_sd(values: Sequence[float | None]) -> dict:
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "sd": statistics.stdev(present) if len(present) > 1 else None,
        "n": len(present),
        "values": list(values),
    }


def summarize(docs: Sequence[dict]) -> dict:
    """Across seeds: per arm, mean / sd / per-seed values of every figure, plus the back-tests."""
    per_seed = [seed_metrics(doc) for doc in docs]
    arms = [name for name in per_seed[0] if all(name in m for m in per_seed)]
    keys = ("accuracy", "after_jump", "vanilla_steps_to_match", "step_saving", "icer")
    arms_summary = {arm: {key: _mean_sd([m[arm][key] for m in per_seed]) for key in keys} for arm in arms}
    for arm in arms:
        arms_summary[arm]["steps"] = per_seed[0][arm]["steps"]
    backtests = [
        {
            "seed": doc["seed"],
            "winner": doc["fit"]["backtest"]["winner"],
            "summary": doc["fit"]["backtest"]["summary"],
            "methods": doc["fit"]["backtest"]["methods"],
        }
        for doc in docs
    ]
    return {
        "seeds": [doc["seed"] for doc in docs],
        "budget": docs[0]["budget"],
        "sft_accuracy": _mean_sd([doc["sft_accuracy"] for doc in docs]),
        "arms": arms_summary,
        "backtest": backtests,
        "seconds": {doc["seed"]: doc["seconds"] for doc in docs},
    }


def _fmt(stat: dict, percent: bool = False, digits: int = 1, missing: str = "never") -> str:
    """``mean ± sd`` over the seeds that have a value, and how many seeds had ``missing`` instead."""
    if stat["mean"] is None:
        return missing
    scale = 100.0 if percent else 1.0
    text = f"{scale * stat['mean']:.{digits}f}"
    if stat["sd"] is not None:
        text += f" ± {scale * stat['sd']:.{digits}f}"
    absent = len(stat["values"]) - stat["n"]
    return text + (f" ({absent}× {missing})" if absent else "")


def markdown_table(summary: dict) -> str:
    """The README's summary table: one row per arm, mean ± sd over seeds."""
    lines = [
        "| arm | RL steps | held-out acc. (%) | acc. right after the jump (%) | vanilla steps to match "
        "| step saving (%) | ICER ↓ |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in summary["arms"].items():
        vanilla = arm.startswith("vanilla")
        jump = "–" if vanilla else _fmt(row["after_jump"], percent=True)
        match = "–" if vanilla else _fmt(row["vanilla_steps_to_match"], digits=0, missing="never")
        saving = "–" if vanilla else _fmt(row["step_saving"], percent=True, missing="never matched")
        lines.append(
            f"| {arm} | {row['steps']} | {_fmt(row['accuracy'], percent=True)} | {jump} "
            f"| {match} | {saving} | {_fmt(row['icer'], missing='no gain')} |"
        )
    return "\n".join(lines)


def backtest_table(summary: dict) -> str:
    """The ``fit --json`` back-test figures per seed: overall σ-weighted cosine and σ relative error."""
    lines = [
        "| seed | method | cosine (overall) | σ rel. error (overall) | winner |",
        "|---|---|---|---|---|",
    ]
    for entry in summary["backtest"]:
        for method, score in entry["methods"].items():
            if score is None:
                lines.append(f"| {entry['seed']} | {method} | – | – | {entry['winner']} |")
                continue
            lines.append(
                f"| {entry['seed']} | {method} | {score['cosine']['overall']:.3f} "
                f"| {score['sigma_rel_err']['overall']:.3f} | {entry['winner']} |"
            )
    return "\n".join(lines)


def write_curves_csv(docs: Sequence[dict], path: Path) -> None:
    """Every evaluation: seed, arm, global RL step, held-out accuracy."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "arm", "step", "accuracy"])
        for doc in docs:
            for arm, curve in doc["curves"].items():
                for step, acc in curve:
                    writer.writerow([doc["seed"], arm, int(step), f"{acc:.4f}"])


COLORS = {"vanilla": "black", "restart": "grey", "next": "C0", "last-interval": "C1", "linear-rank1": "C2"}


def _style(arm: str) -> dict:
    """One colour per method in both panels; the adapter output dashed in its method's colour."""
    method = arm.split("-a")[0] if "-a" in arm else arm
    return {"color": COLORS.get(method, "C3"), "ls": "--" if arm.endswith("-adapter") else "-"}


def plot(docs: Sequence[dict], summary: dict, path: Path, highlight_alpha: float) -> None:
    """Left: mean accuracy vs RL steps (vanilla, restart, α = ``highlight_alpha`` arms). Right: final vs α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    shown = [
        arm
        for arm in docs[0]["curves"]
        if arm in ("vanilla", "restart") or arm.endswith(f"-a{highlight_alpha:g}") or arm.endswith("-adapter")
    ]
    for arm in shown:
        curves = [doc["curves"][arm] for doc in docs if arm in doc["curves"]]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
        marker = None if arm == "vanilla" else "."
        left.plot(steps, [100 * m for m in mean], marker=marker, label=arm, **_style(arm))
    budget = summary["budget"]
    left.axvline(15 * budget / 40, color="grey", lw=0.8, ls=":")
    left.set_xlabel("RL steps")
    left.set_ylabel("held-out accuracy (%), greedy")
    left.set_title(f"accuracy vs RL steps (mean of {len(docs)} seed(s))")
    left.legend(fontsize=8)
    arms = summary["arms"]
    for method in ("next", "last-interval", "linear-rank1"):
        points = sorted(
            (float(arm.split("-a")[-1]), row["accuracy"]["mean"])
            for arm, row in arms.items()
            if arm.startswith(f"{method}-a") and not arm.endswith("-adapter")
        )
        if points:
            alphas, means = [a for a, _ in points], [100 * m for _, m in points]
            right.plot(alphas, means, marker="o", label=method, color=COLORS[method])
    for arm, style in (("vanilla@250/400", "--"), ("vanilla@400/400", "-"), ("restart", ":")):
        if arm in arms:
            color = COLORS["restart" if arm == "restart" else "vanilla"]
            right.axhline(100 * arms[arm]["accuracy"]["mean"], color=color, ls=style, lw=1, label=arm)
    right.set_xlabel("α (extending coefficient)")
    right.set_ylabel("held-out accuracy after 250/400 of the budget (%)")
    right.set_title("final accuracy vs α")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(docs: Sequence[dict], out: Path, highlight_alpha: float = 1.5) -> dict:
    """Write ``summary.json``, ``summary.md``, ``curves.csv``, ``accuracy_vs_steps.png`` and the raw
    per-seed documents ``seed-N.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        (out / f"seed-{doc['seed']}.json").write_text(json.dumps(doc, indent=1))
    summary = summarize(docs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown_table(summary) + "\n\n" + backtest_table(summary) + "\n")
    write_curves_csv(docs, out / "curves.csv")
    plot(docs, summary, out / "accuracy_vs_steps.png", highlight_alpha)
    return summary
