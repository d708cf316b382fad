"""The in-place measurement (issue 13): regimes × arms × seeds, then the report.

    python -m examples.trl_grpo.sweep --out trl-inplace --arms reduced --budget 80     # `make example`
    python -m examples.trl_grpo.sweep --out trl-inplace --seeds 0 1 2 \\
        --results examples/trl_grpo/results/in-place-sharpening                      # the full sweep

``--out`` holds every model and run and is resumable (finished arms are skipped). The report
(``--results``, default ``OUT/results``) has, per arm and over the seeds (mean ± sd):

- **avg@8** (sampled, T = 1) and greedy accuracy at the end step (250/400 of the budget);
- **steps to match**: the vanilla steps whose avg@8 the arm reaches, on the isotonic fit of the
  vanilla curve, interpolated (``nexttools.worth``, the advisor's own definition), ``≥`` when
  vanilla never got there; **saving** = 1 − end step / steps to match;
- **Δ vs no jump**: the paired difference in avg@8 against the in-place no-jump arm of the same
  seed, at the end step and averaged over every step after the jump;
- **the advisor's call**: ``nexttools backtest``'s worth for the arm's (method, α), recorded before
  the arm ran, beside its measured saving.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from examples.trl_grpo.in_place import (
    REDUCED_ADVISOR,
    Advisor,
    Arm,
    full_arms,
    reduced_arms,
    relex_arms,
    run_seed,
)
from examples.trl_grpo.pretrain import pretrain
from examples.trl_grpo.regime import REGIMES, Regime
from examples.trl_grpo.task import make_split
from nexttools.worth import RealCurve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.trl_grpo.sweep", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("trl-inplace"), help="working folder (resumable)")
    parser.add_argument("--results", type=Path, default=None, help="report folder [default: OUT/results]")
    parser.add_argument("--regime", choices=list(REGIMES), default="sharpening")
    parser.add_argument("--budget", type=int, default=400, help="S, vanilla RL steps (a multiple of 40)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", choices=["full", "reduced", "relex"], default="full")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)"
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def start_model(root: Path, regime: Regime) -> Path:
    """The regime's SFT'd start model under ``root`` (built once)."""
    folder = root / f"start-{regime.name}"
    if not (folder / "config.json").exists() or not (folder / "tokenizer.json").exists():
        log(f"start model ({regime.name}): build a tiny Llama and SFT it on two-digit addition")
        done = pretrain(
            folder,
            make_split(),
            target=regime.sft_target,
            hidden_size=regime.hidden_size,
            intermediate_size=regime.intermediate_size,
            num_layers=regime.num_layers,
            max_steps=regime.sft_max_steps,
            noisy_last_digit=regime.noisy_last_digit,
        )
        log(
            f"SFT stopped after {done.steps} steps, validation greedy accuracy {100 * done.val_accuracy:.1f}%"
        )
    return folder


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.budget % 40 or args.budget <= 0:
        raise SystemExit(f"--budget must be a positive multiple of 40, got {args.budget}")
    torch.set_num_threads(args.threads)
    regime = REGIMES[args.regime]
    arms = {"full": full_arms, "reduced": reduced_arms, "relex": relex_arms}[args.arms]()
    advisor = REDUCED_ADVISOR if args.arms == "reduced" else Advisor()
    split = make_split()
    start = start_model(args.out, regime)
    documents = [
        run_seed(
            args.out / regime.name / f"seed-{seed}",
            start,
            split,
            regime,
            args.budget,
            arms,
            seed,
            log,
            advisor,
        )
        for seed in args.seeds
    ]
    summary = write_report(documents, arms, args.results or args.out / "results")
    print(markdown(summary))
    return summary


# -------------------------------------------------------------------------------------------------
# The report.


def _at(curve: list[list[float]], step: int) -> list[float]:
    return next(point[1:] for point in curve if point[0] == step)


def arm_metrics(document: dict, arm: Arm) -> dict:
    """One seed's figures for one arm (module docstring)."""
    budget = document["budget"]
    every = budget // 40
    prefix, end = 15 * every, 25 * every
    vanilla = document["curves"]["vanilla"]
    curve = document["curves"][arm.name]
    reference = RealCurve.of([p[0] for p in vanilla], [p[1] for p in vanilla])
    sampled, greedy = _at(curve, end)
    matched, bound = reference.steps_to_reach(sampled)
    baseline = document["curves"].get("in-place/no-jump")
    paired_end = paired_mean = None
    if baseline is not None:
        pairs = [(p[1], _at(baseline, p[0])[0]) for p in curve if p[0] > prefix]
        paired_end = sampled - _at(baseline, end)[0]
        paired_mean = statistics.fmean(a - b for a, b in pairs)
    worth = predicted_steps = predicted_steps_mean = None
    backtest = document.get("backtest", {})
    for result in backtest.get("results", []):  # from the latest origin (what one origin gives)
        if result["method"] == arm.method and result["alpha"] == arm.alpha:
            worth, predicted_steps = result["worth"], result["steps_worth"]
    for spread in backtest.get("spreads", []):  # the mean over the origins (--origins)
        if spread["method"] == arm.method and spread["alpha"] == arm.alpha:
            predicted_steps_mean = spread["steps_worth_mean"]
    return {
        "after_jump": _at(curve, prefix)[0],
        "avg8": sampled,
        "greedy": greedy,
        "steps_to_match": matched,
        "lower_bound": bound,
        "saving": 1.0 - end / matched if matched > 0 else None,
        "paired_end": paired_end,
        "paired_mean": paired_mean,
        "predicted_worth": worth,
        "predicted_steps": predicted_steps,
        "predicted_steps_mean": predicted_steps_mean,
        "measured_steps": matched - end,
    }


def rank_correlation(x: list[float], y: list[float]) -> float | None:
    """Spearman's ρ (ties get their mean rank); None with fewer than 3 pairs."""
    if len(x) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for n in range(i, j + 1):
                out[order[n]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    scale = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / scale if scale > 0 else None


def _spread(values: list[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "sd": None, "n": 0}
    sd = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "sd": sd, "n": len(present)}


def write_report(documents: list[dict], arms: list[Arm], folder: Path) -> dict:
    """``summary.json``, ``summary.md``, one JSON per seed and the plots into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for document in documents:
        (folder / f"seed-{document['seed']}.json").write_text(json.dumps(document, indent=1))
    rows = {}
    for arm in arms:
        per_seed = [arm_metrics(d, arm) for d in documents if arm.name in d["curves"]]
        if per_seed:
            rows[arm.name] = {
                key: _spread([m[key] for m in per_seed]) for key in per_seed[0] if key != "lower_bound"
            }
            rows[arm.name]["lower_bound"] = any(m["lower_bound"] for m in per_seed)
    first = documents[0]
    every = first["budget"] // 40
    vanilla = {
        f"vanilla@{s}": _spread([_at(d["curves"]["vanilla"], s)[0] for d in documents])
        for s in (15 * every, 25 * every, 40 * every)
    }
    advisor = []
    for d in documents:
        if "backtest" not in d:
            continue
        metrics = [
            arm_metrics(d, arm) for arm in arms if arm.protocol == "in-place" and arm.name in d["curves"]
        ]
        pairs = [
            (m["predicted_steps"], m["measured_steps"]) for m in metrics if m["predicted_steps"] is not None
        ]
        means = [
            (m["predicted_steps_mean"], m["measured_steps"])
            for m in metrics
            if m["predicted_steps_mean"] is not None
        ]
        advisor.append(
            {
                "seed": d["seed"],
                "recommendation": d["backtest"]["recommendation"],
                "reason": d["backtest"]["reason"],
                "spearman_predicted_vs_measured_steps": rank_correlation(
                    [a for a, _ in pairs], [b for _, b in pairs]
                ),
                "spearman_mean_over_origins": rank_correlation([a for a, _ in means], [b for _, b in means]),
                "pairs": len(pairs),
            }
        )
    summary = {
        "regime": first["regime"],
        "budget": first["budget"],
        "seeds": [d["seed"] for d in documents],
        "vanilla": vanilla,
        "arms": rows,
        "advisor": advisor,
        "consistency": [d["extract"].get("consistency") for d in documents if "extract" in d],
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    (folder / "summary.md").write_text(markdown(summary) + "\n")
    _plots(documents, arms, summary, folder)
    return summary


def _fmt(spread: dict, percent: bool = True) -> str:
    if spread["mean"] is None:
        return "–"
    scale = 100 if percent else 1
    return f"{scale * spread['mean']:.1f} ± {scale * spread['sd']:.1f}"


def markdown(summary: dict) -> str:
    """The results table (percent; mean ± sd over the seeds)."""
    budget = summary["budget"]
    end = 25 * budget // 40
    lines = [
        f"Regime {summary['regime']}, budget {budget}, seeds {summary['seeds']}; "
        f"every arm ends at step {end}.",
        "",
        "| arm | avg@8 after the jump | avg@8 @end | greedy @end | vanilla steps to match | saving (%) "
        "| Δ avg@8 vs no jump, end / mean | backtest worth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, value in summary["vanilla"].items():
        lines.append(f"| {name} | | {_fmt(value)} | | | | | |")
    seeds = len(summary["seeds"])
    for name, row in summary["arms"].items():
        bound = "≥ " if row["lower_bound"] else ""
        count = row["avg8"]["n"]
        label = name if count == seeds else f"{name} ({count} of {seeds} seeds)"
        lines.append(
            f"| {label} | {_fmt(row['after_jump'])} | {_fmt(row['avg8'])} | {_fmt(row['greedy'])} "
            f"| {bound}{_fmt(row['steps_to_match'], percent=False)} | {_fmt(row['saving'])} "
            f"| {_fmt(row['paired_end'])} / {_fmt(row['paired_mean'])} "
            f"| {_fmt(row['predicted_worth'], percent=False)} |"
        )
    lines.append("")
    for call in summary["advisor"]:
        chosen = call["recommendation"]
        verdict = "do not extrapolate" if chosen is None else f"{chosen['method']} at α={chosen['alpha']:g}"
        rho, rho_mean = call["spearman_predicted_vs_measured_steps"], call.get("spearman_mean_over_origins")
        agreement = (
            ""
            if rho is None
            else f"; Spearman ρ(predicted, measured steps) = {rho:.2f} over {call['pairs']} arms"
            " from the latest origin"
            + ("" if rho_mean is None else f", {rho_mean:.2f} from the mean over the origins")
        )
        lines.append(f"- advisor, seed {call['seed']}: {verdict} ({call['reason']}){agreement}")
    return "\n".join(lines)


def _plots(documents: list[dict], arms: list[Arm], summary: dict, folder: Path) -> None:
    """accuracy_vs_steps.png (mean avg@8 of every arm and vanilla) and worth_vs_saving.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install 'nexttools[plots]')")
        return
    figure, ax = plt.subplots(figsize=(9, 6), constrained_layout=True)
    for name in ["vanilla", *(a.name for a in arms)]:
        curves = [d["curves"][name] for d in documents if name in d["curves"]]
        if not curves:
            continue
        steps = [p[0] for p in curves[0]]
        means = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
        style = {"color": "black", "linewidth": 2.5} if name == "vanilla" else {"marker": "."}
        ax.plot(steps, means, label=name, **style)
    ax.set_xlabel("RL step")
    ax.set_ylabel("avg@8 on 500 held-out prompts (mean over seeds)")
    ax.set_title(f"{summary['regime']} regime: in-place jumps at step {15 * summary['budget'] // 40}")
    ax.legend(fontsize="small", ncols=2)
    figure.savefig(folder / "accuracy_vs_steps.png", dpi=110)
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(6, 5), constrained_layout=True)
    for name, row in summary["arms"].items():
        if row["predicted_worth"]["mean"] is not None and row["saving"]["mean"] is not None:
            ax.scatter(row["predicted_worth"]["mean"], 100 * row["saving"]["mean"])
            ax.annotate(
                name.removeprefix("in-place/"),
                (row["predicted_worth"]["mean"], 100 * row["saving"]["mean"]),
                fontsize=7,
            )
    ax.axhline(0, color="grey", linestyle=":")
    ax.set_xlabel("worth predicted by nexttools backtest (before the arm ran)")
    ax.set_ylabel("step saving measured (%)")
    figure.savefig(folder / "worth_vs_saving.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
