"""Repeated in-place jumps (issue 26): ``JumpCallback`` schedules against vanilla and one jump.

    python -m examples.trl_grpo.schedule --out trl-schedule --seeds 0 1 2 \\
        --results examples/trl_grpo/results/schedule-sharpening

Per seed, in the regime's start model (the example's sharpening regime by default), LoRA GRPO with a
checkpoint every 10 steps, avg@8 (T = 1) and greedy accuracy on the 500 held-out prompts at every
checkpoint:

- **vanilla**: 400 steps;
- every other arm starts from vanilla's own checkpoints up to 10 steps before its first jump (the
  same run until then: same seed, resumed in place) and trains in chunks of 50 steps with a
  :class:`nexttools.schedule.callback.JumpCallback`, resumed with TRL's ``resume_from_checkpoint``
  (the callback resumes its schedule from its record), until its avg@8 passes vanilla@400's or it
  reaches step 400:
  - ``single-150``: one ``factor-linear`` α = 1.5 jump at step 150;
  - ``fl1.5-every50``: ``factor-linear`` α = 1.5 at 100, 150, 200, ...; ``+gate`` keeps a jump only if
    avg@4 on 200 training-pool prompts (the gate's validation set, never the held-out ones; sampled
    with the same seed before and after, so the comparison is paired) does not drop. Greedy accuracy
    would not do: the sharpening regime's start model is already right under greedy decoding (0.995
    on these prompts), and what RL changes is the sampled distribution;
  - ``fl2-every30``: the aggressive schedule, α = 2 every 30 steps from 60, with and without the gate;
  - ``regrounding-50``: periodic re-grounding as RLVR-Linearity v3 defines it (arXiv 2601.04537v3):
    an RL segment of 50 steps (fresh LoRA, fresh optimizer), then W = W_0 + (t/s)·ΔW with t/s = 2
    (``rl-extra`` at α = 1: k = 5 checkpoints of 10 steps ahead), written merged, and the next
    segment restarts from it, until the goal or 400 RL steps. Each segment draws its prompts with
    the seed plus the round, so no segment replays the last one's batches.

Reported per arm (mean ± sd over seeds): the RL steps to reach vanilla@250's and vanilla@400's avg@8
(vanilla's isotonic fit at 250 and 400), the saving against 250 and 400, the jumps kept, and the
wall-clock cost of one jump (store update + jump + gate) against one RL step. ``--out`` is resumable:
finished arms are skipped, an arm cut short restarts from its last finished chunk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from examples.trl_grpo.evaluate import accuracy, load_policy, sampled_accuracy
from examples.trl_grpo.grpo import train_grpo
from examples.trl_grpo.regime import REGIMES, Regime
from examples.trl_grpo.sweep import log, start_model
from examples.trl_grpo.task import Split, make_split
from nexttools.base_shifts import BaseShifts
from nexttools.jump_record import read_jumps
from nexttools.schedule.live import fold_shifts
from nexttools.worth import RealCurve

BUDGET, EVERY, CHUNK = 400, 10, 50
GATE_PROMPTS, GATE_SAMPLES = 200, 4


@dataclass(frozen=True)
class ScheduleArm:
    """A jump schedule: ``start``, ``every`` (None: one jump), ``method``, ``alpha``, ``gate``."""

    name: str
    start: int
    every: int | None
    alpha: float
    gate: bool = False
    method: str = "factor-linear"


ARMS = [
    ScheduleArm("single-150", 150, None, 1.5),
    ScheduleArm("fl1.5-every50", 100, 50, 1.5),
    ScheduleArm("fl1.5-every50+gate", 100, 50, 1.5, gate=True),
    ScheduleArm("next1.5-every50", 100, 50, 1.5, method="next"),
    ScheduleArm("next1.5-every50+gate", 100, 50, 1.5, gate=True, method="next"),
    ScheduleArm("fl2-every30", 60, 30, 2.0),
    ScheduleArm("fl2-every30+gate", 60, 30, 2.0, gate=True),
    ScheduleArm("regrounding-50", 50, 50, 1.0, method="regrounding"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.trl_grpo.schedule", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("trl-schedule"), help="working folder (resumable)")
    parser.add_argument("--results", type=Path, default=None, help="report folder [default: OUT/results]")
    parser.add_argument("--regime", choices=list(REGIMES), default="sharpening")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--arms", nargs="+", default=[arm.name for arm in ARMS], choices=[a.name for a in ARMS]
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    regime = REGIMES[args.regime]
    split = make_split()
    start = start_model(args.out, regime)
    arms = [arm for arm in ARMS if arm.name in args.arms]
    documents = [
        run_seed(args.out / regime.name / f"seed-{seed}", start, split, regime, arms, seed)
        for seed in args.seeds
    ]
    summary = report(documents, arms, args.results or args.out / "results")
    print(markdown(summary))
    return summary


def run_seed(
    seed_dir: Path, start: Path, split: Split, regime: Regime, arms: list[ScheduleArm], seed: int
) -> dict:
    """Vanilla and every arm of one seed (resumable); the document is also ``seed_dir/results.json``."""
    from nexttools.schedule.callback import JumpCallback

    path = seed_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"curves": {}, "seconds": {}, "jumps": {}}
    results.update(seed=seed, regime=regime.name)
    seed_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(start)
    gate_set = split.train[:GATE_PROMPTS]

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    def score(adapter: Path | None, model_dir: Path = start, work: Path | None = None) -> list[float]:
        """avg@8 and greedy accuracy of ``adapter`` on ``model_dir``, with the base shifts that the
        arm's ``work`` kept up to the adapter's step folded in (the weights the run really had)."""
        policy = load_policy(model_dir, adapter)
        if work is not None and adapter is not None:
            shifts = BaseShifts.of_workdir(work)
            step = int(adapter.name.split("-")[-1])
            fold_shifts(policy, shifts, {s for s in shifts.steps if s <= step})
        return [
            sampled_accuracy(policy, tokenizer, split.heldout),
            accuracy(policy, tokenizer, split.heldout),
        ]

    vanilla = seed_dir / "vanilla"
    if "vanilla" not in results["curves"]:
        log(f"seed {seed}: vanilla, {BUDGET} steps")
        seconds = train_grpo(
            start, vanilla, split.train, steps=BUDGET, save_every=EVERY, seed=seed, settings=regime.settings
        )
        results["seconds"]["vanilla"] = seconds
        results["curves"]["vanilla"] = [[0, *score(None)]] + [
            [s, *score(vanilla / f"checkpoint-{s}")] for s in range(EVERY, BUDGET + 1, EVERY)
        ]
        save()
    curve = results["curves"]["vanilla"]
    goal = RealCurve.of([p[0] for p in curve], [p[1] for p in curve]).fitted[-1]

    def gate(model: torch.nn.Module) -> float:
        return sampled_accuracy(model, tokenizer, gate_set, samples=GATE_SAMPLES, seed=1)

    for arm in arms:
        if arm.name in results["curves"] and results["curves"][arm.name][-1][0] >= BUDGET:
            continue
        points = results["curves"].get(arm.name)
        if points and points[-1][1] >= goal:
            continue
        if arm.method == "regrounding":
            _regrounding(arm, seed_dir / "arms" / arm.name, start, split, regime, seed, score, goal, results)
            save()
            continue
        out = seed_dir / "arms" / arm.name
        run, work = out / "run", out / "nexttools-run"
        if points is None:  # a fresh arm: vanilla's own checkpoints up to 10 steps before the first jump
            shutil.rmtree(out, ignore_errors=True)
            for step in range(EVERY, arm.start, EVERY):
                shutil.copytree(vanilla / f"checkpoint-{step}", run / f"checkpoint-{step}")
            points = [p for p in curve if p[0] <= arm.start - EVERY]
            results["seconds"][arm.name] = 0.0
        while points[-1][0] < BUDGET and points[-1][1] < goal:
            last = points[-1][0]
            end = min(last + CHUNK, BUDGET)
            log(f"seed {seed}: {arm.name}: steps {last} -> {end}")
            callback = JumpCallback(
                work,
                every=arm.every or EVERY,
                start=arm.start,
                stop=None if arm.every else arm.start + 1,
                method=arm.method,
                alpha=arm.alpha,
                base=str(start),
                gate=gate if arm.gate else None,
            )
            seconds = train_grpo(
                start, run, split.train, steps=end, save_every=EVERY, seed=seed, settings=regime.settings,
                resume_from=run / f"checkpoint-{last}", attach=[callback.attach],
            )  # fmt: skip
            results["seconds"][arm.name] += seconds
            points += [
                [s, *score(run / f"checkpoint-{s}", work=work)] for s in range(last + EVERY, end + 1, EVERY)
            ]
            results["curves"][arm.name] = points
            results["jumps"][arm.name] = [entry.__dict__ for entry in read_jumps(work)]
            save()
    return results


def _regrounding(
    arm: ScheduleArm,
    out: Path,
    start: Path,
    split: Split,
    regime: Regime,
    seed: int,
    score: Callable[..., list[float]],
    goal: float,
    results: dict,
) -> None:
    """Periodic re-grounding (module docstring): segments of ``arm.every`` RL steps, each followed by
    ``rl-extra`` at ``arm.alpha`` written merged, on which the next segment restarts. Resumable by
    round (a round cut short is redone)."""
    from nexttools.extract import ExtractOptions, extract
    from nexttools.extrapolate import ExtrapolateOptions, extrapolate

    segment = arm.every or CHUNK
    points = results["curves"].get(arm.name) or [[0, *score(None)]]
    results["seconds"].setdefault(arm.name, 0.0)
    results["jumps"].setdefault(arm.name, [])
    model, done = start, 0
    for round_ in range(BUDGET // segment):
        folder = out / f"round-{round_}"
        jumped = folder / "model"
        if done + segment <= points[-1][0] and jumped.is_dir():  # finished before a resume
            model, done = jumped, done + segment
            continue
        if done >= BUDGET or points[-1][1] >= goal:
            break
        log(f"seed {seed}: {arm.name}: round {round_}, RL steps {done} -> {done + segment}")
        shutil.rmtree(folder, ignore_errors=True)
        results["seconds"][arm.name] += train_grpo(
            model, folder / "run", split.train, steps=segment, save_every=EVERY, seed=seed + round_,
            settings=regime.settings,
        )  # fmt: skip
        points = [p for p in points if p[0] <= done]
        points += [
            [done + s, *score(folder / "run" / f"checkpoint-{s}", model)]
            for s in range(EVERY, segment + 1, EVERY)
        ]
        done += segment
        if points[-1][1] >= goal or done >= BUDGET:
            results["curves"][arm.name] = points
            break
        started = time.monotonic()
        extract(ExtractOptions(run=folder / "run", base=str(model), workdir=folder / "work", k=5))
        extrapolate(
            ExtrapolateOptions(
                workdir=folder / "work", method="rl-extra", alpha=arm.alpha, format="merged", out=jumped
            )
        )
        results["jumps"][arm.name].append(
            {"step": done, "kept": True, "seconds_update": time.monotonic() - started, "seconds_jump": 0.0}
        )
        points.append([done, *score(None, jumped)])  # the re-grounded model, before its segment
        model = jumped
        results["curves"][arm.name] = points


# -------------------------------------------------------------------------------------------------
# The report.


def first_step(curve: list[list[float]], level: float) -> int | None:
    """The first checkpoint step whose avg@8 reaches ``level`` (None: never)."""
    return next((int(p[0]) for p in curve if p[1] >= level), None)


def arm_metrics(document: dict, arm: ScheduleArm) -> dict:
    curve = document["curves"]["vanilla"]
    fitted = RealCurve.of([p[0] for p in curve], [p[1] for p in curve]).fitted
    steps = [p[0] for p in curve]
    at250, at400 = float(fitted[steps.index(250)]), float(fitted[-1])
    points = document["curves"][arm.name]
    jumps = document["jumps"].get(arm.name, [])
    shared = 0 if arm.method == "regrounding" else arm.start - EVERY  # steps copied from vanilla
    trained = points[-1][0] - shared
    rl_step = document["seconds"][arm.name] / max(trained, 1)
    jump_seconds = [j["seconds_update"] + j["seconds_jump"] for j in jumps]
    reach250, reach400 = first_step(points, at250), first_step(points, at400)
    return {
        "reach_v250": reach250,
        "reach_v400": reach400,
        "saving_v250": None if reach250 is None else 1 - reach250 / 250,
        "saving_v400": None if reach400 is None else 1 - reach400 / 400,
        "jumps_kept": sum(j["kept"] for j in jumps),
        "jumps_tried": len(jumps),
        "jump_seconds": statistics.fmean(jump_seconds) if jump_seconds else None,
        "rl_step_seconds": rl_step,
        "final_step": points[-1][0],
        "final_avg8": points[-1][1],
    }


def report(documents: list[dict], arms: list[ScheduleArm], folder: Path) -> dict:
    """Per arm and seed, and mean ± sd over the seeds; ``summary.json``, ``summary.md`` and the plot."""
    folder.mkdir(parents=True, exist_ok=True)
    for document in documents:
        (folder / f"seed-{document['seed']}.json").write_text(json.dumps(document, indent=1))
    summary: dict = {"seeds": [d["seed"] for d in documents], "arms": {}}
    vanilla_reach = {
        "reach_v250": 250,
        "reach_v400": 400,
        "rl_step_seconds": statistics.fmean(d["seconds"]["vanilla"] / BUDGET for d in documents),
    }
    summary["arms"]["vanilla"] = {"per_seed": [vanilla_reach] * len(documents)}
    for arm in arms:
        per_seed = [arm_metrics(d, arm) for d in documents if arm.name in d["curves"]]
        summary["arms"][arm.name] = {"per_seed": per_seed}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    (folder / "summary.md").write_text(markdown(summary))
    _plot(documents, arms, folder / "curves.png")
    return summary


def _mean_sd(values: list[float | None], scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    if not values:
        return "–"
    known = [v * scale for v in values if v is not None]
    never = len(values) - len(known)
    if not known:
        return "never"
    text = f"{statistics.fmean(known):.{digits}f}"
    if len(known) > 1:
        text += f" ± {statistics.stdev(known):.{digits}f}"
    return text + unit + (f" ({never} never)" if never else "")


def markdown(summary: dict) -> str:
    lines = [
        f"seeds {summary['seeds']}; RL steps to reach vanilla@250's / vanilla@400's avg@8, "
        "saving = 1 − steps / 250 (400)",
        "",
        "| arm | steps to vanilla@250 | saving | steps to vanilla@400 | saving | jumps kept / tried "
        "| s per jump / per RL step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in summary["arms"].items():
        rows = arm["per_seed"]
        if name == "vanilla":
            step = statistics.fmean(r["rl_step_seconds"] for r in rows)
            lines.append(f"| vanilla | 250 | – | 400 | – | – | – / {step:.2f} |")
            continue
        kept = f"{sum(r['jumps_kept'] for r in rows)} / {sum(r['jumps_tried'] for r in rows)}"
        jump = [r["jump_seconds"] for r in rows if r["jump_seconds"] is not None]
        cost = f"{statistics.fmean(jump):.1f}" if jump else "–"
        step = statistics.fmean(r["rl_step_seconds"] for r in rows)
        lines.append(
            f"| {name} | {_mean_sd([r['reach_v250'] for r in rows], digits=0)} | "
            f"{_mean_sd([r['saving_v250'] for r in rows], 100, unit=' %')} | "
            f"{_mean_sd([r['reach_v400'] for r in rows], digits=0)} | "
            f"{_mean_sd([r['saving_v400'] for r in rows], 100, unit=' %')} | {kept} | {cost} / {step:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(documents: list[dict], arms: list[ScheduleArm], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(documents), figsize=(6 * len(documents), 4.5), squeeze=False)
    for ax, document in zip(axes[0], documents, strict=True):
        for name in ["vanilla", *(a.name for a in arms)]:
            if name in document["curves"]:
                points = document["curves"][name]
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    label=name,
                    lw=2 if name == "vanilla" else 1,
                )
        ax.set_title(f"seed {document['seed']}: avg@8 on 500 held-out prompts")
        ax.set_xlabel("RL step")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def _tokenizer(model_dir: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


if __name__ == "__main__":
    started = time.monotonic()
    main()
    log(f"done in {time.monotonic() - started:.0f} s")
