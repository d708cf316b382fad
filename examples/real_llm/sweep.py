"""The in-place saving on a real pretrained LLM (SmolLM2-135M-Instruct, LoRA GRPO with TRL).

    python -m examples.real_llm.sweep --out real-llm-sweep --seeds 0            # CPU scale
    python -m examples.real_llm.sweep --out real-llm-sweep --seeds 0 1 2 \\
        --budget 80 --prompts 16 --heldout 256                                # one GPU (gpu.sh)

The example's protocol (``examples/trl_grpo``), at the scale the machine allows: vanilla GRPO for
``--budget`` steps with a checkpoint every ``budget/20``; every arm resumes vanilla's own checkpoint at
3/8 of the budget in place and trains to 5/8 of it:

- ``no-jump``: the run's own checkpoint, resumed (the noise band: it should save 0);
- ``oracle``: the base moved by the run's true next k checkpoints (W₀ + W_{o+k} − W_o);
- ``factor-linear-a1.5``: ``extrapolate --format checkpoint`` (the adapter jumps, optimizer kept);
- ``next-a1.5``: ``extrapolate --format base`` (``fit`` first);
- ``schedule``: ``JumpCallback``, ``factor-linear`` α 1.5 at the first checkpoint after the origin
  and every 4 checkpoints after it.

The metric is greedy held-out accuracy (the right sum anywhere in the first 24 tokens; ``grpo.py``),
on ``--heldout`` prompts; the saving is 1 − end / (vanilla steps to match), on vanilla's isotonic fit.
``--out`` is resumable: vanilla trains in chunks (TRL's ``resume_from_checkpoint``), finished arms
are kept, and ``results.json`` is written after every piece.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from examples.real_llm.grpo import accuracy, heldout, train
from examples.real_llm.prepare import FOLDER, default_cache
from examples.trl_grpo.in_place import _oracle_base
from examples.trl_grpo.pipeline import run_nexttools
from nexttools.worth import RealCurve

K, ALPHA = 5, 1.5
Hook = Callable[[Any], object]
ARMS = ("no-jump", "oracle", "factor-linear-a1.5", "next-a1.5", "schedule")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.real_llm.sweep", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("real-llm-sweep"), help="working folder (resumable)")
    parser.add_argument(
        "--model", type=Path, default=default_cache() / FOLDER, help="`make real-llm`'s folder"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", type=int, default=40, help="vanilla RL steps (a multiple of 20)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (4 generations each)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out prompts scored per checkpoint")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.budget % 20:
        raise SystemExit("--budget must be a multiple of 20")
    documents = [run_seed(args, seed) for seed in args.seeds]
    report = summarize(documents)
    (args.out / "summary.json").write_text(json.dumps(report, indent=1))
    (args.out / "summary.md").write_text(markdown(report) + "\n")
    plot(documents, args.out / "accuracy_vs_steps.png")
    print(markdown(report))
    return documents


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    folder = args.out / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    doc = json.loads(path.read_text()) if path.exists() else {"curves": {}, "seconds": {}}
    doc.update(seed=seed, budget=args.budget, prompts=args.prompts, heldout=args.heldout, k=K)
    every = args.budget // 20
    origin, end = 3 * args.budget // 8 // every * every, 5 * args.budget // 8 // every * every
    tasks = heldout(args.heldout)
    model_dir = Path(args.model)

    def save() -> None:
        path.write_text(json.dumps(doc, indent=1))

    def score(base: Path, adapter: Path | None) -> float:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        return accuracy(model, tokenizer, tasks)

    def run_to(
        base: Path, run: Path, first: int, last: int, resume: Path | None, attach: Sequence[Hook] = ()
    ) -> list[list[float]]:
        started = time.monotonic()
        train(base, run, steps=last, save_every=every, seed=seed, prompts_per_step=args.prompts,
              resume_from=resume, attach=attach)  # fmt: skip
        doc["seconds"][str(run.name)] = doc["seconds"].get(str(run.name), 0.0) + time.monotonic() - started
        return [[s, score(base, run / f"checkpoint-{s}")] for s in range(first + every, last + 1, every)]

    vanilla = folder / "vanilla"
    curve = doc["curves"].setdefault("vanilla", [[0, score(model_dir, None)]])
    save()
    while curve[-1][0] < args.budget:  # in chunks of 4 checkpoints: a stopped sweep loses one chunk
        last = int(curve[-1][0])
        resume = vanilla / f"checkpoint-{last}" if last else None
        curve += run_to(model_dir, vanilla, last, min(last + 4 * every, args.budget), resume)
        save()
    checkpoint = vanilla / f"checkpoint-{origin}"
    work = folder / "nexttools-run"
    if not (work / "trajectory.h5").is_file():
        run_nexttools(
            ["extract", str(vanilla), "--base", str(model_dir), "--workdir", str(work),
             "--steps", f":{origin}", "--k", str(K)],
            work / "commands.sh",
        )  # fmt: skip
        doc["fit"] = run_nexttools(["fit", "--workdir", str(work)], work / "commands.sh")["backtest"][
            "summary"
        ]
        save()
    for arm in args.arms:
        if arm in doc["curves"]:
            continue
        jumps = folder / "jumps" / arm
        base, resume = model_dir, checkpoint
        attach: tuple[Hook, ...] = ()
        if arm == "oracle" and not jumps.exists():
            _oracle_base(model_dir, checkpoint, vanilla / f"checkpoint-{origin + K * every}", jumps)
        elif arm in ("factor-linear-a1.5", "next-a1.5") and not jumps.exists():
            method, form = arm.removesuffix("-a1.5"), "checkpoint" if arm.startswith("factor") else "base"
            run_nexttools(
                ["extrapolate", "--workdir", str(work), "--method", method, "--alpha", str(ALPHA),
                 "--format", form, "--out", str(jumps), "--force"],
                work / "commands.sh",
            )  # fmt: skip
        if arm == "oracle" or arm == "next-a1.5":
            base = jumps
        elif arm == "factor-linear-a1.5":
            resume = jumps
        elif arm == "schedule":
            from nexttools.schedule.callback import JumpCallback

            run = folder / "arms" / arm
            shutil.rmtree(run, ignore_errors=True)
            for step in range(every, origin + 1, every):
                shutil.copytree(vanilla / f"checkpoint-{step}", run / f"checkpoint-{step}")
            callback = JumpCallback(
                folder / "schedule-work", every=4 * every, start=origin + every, alpha=ALPHA, k=K,
                base=str(model_dir),
            )  # fmt: skip
            resume, attach = run / f"checkpoint-{origin}", (callback.attach,)
        run = folder / "arms" / arm
        if arm != "schedule":
            shutil.rmtree(run, ignore_errors=True)
        after = score(base, resume)
        doc["curves"][arm] = [[origin, after], *run_to(base, run, origin, end, resume, attach)]
        save()
    return doc


def summarize(documents: list[dict]) -> dict:
    """Per arm and seed: accuracy at the end, vanilla steps to match it, and the saving."""
    arms: dict[str, list[dict]] = {}
    for doc in documents:
        vanilla = doc["curves"]["vanilla"]
        reference = RealCurve.of([p[0] for p in vanilla], [p[1] for p in vanilla])
        for arm, curve in doc["curves"].items():
            if arm == "vanilla":
                continue
            end, score = curve[-1]
            matched, bound = reference.steps_to_reach(score)
            arms.setdefault(arm, []).append(
                {
                    "seed": doc["seed"],
                    "end": end,
                    "accuracy": score,
                    "steps_to_match": matched,
                    "lower_bound": bound,
                    "saving": 1.0 - end / matched if matched > 0 else None,
                }
            )
    return {"arms": arms, "vanilla": {d["seed"]: d["curves"]["vanilla"] for d in documents}}


def markdown(report: dict) -> str:
    """One row per arm and seed: accuracy at the end, vanilla steps to match, saving."""
    lines = [
        "| arm | seed | accuracy @end | vanilla steps to match | saving |",
        "|---|---|---|---|---|",
    ]
    for arm, rows in report["arms"].items():
        for row in rows:
            bound = "≥ " if row["lower_bound"] else ""
            saving = "–" if row["saving"] is None else f"{100 * row['saving']:+.1f} %"
            matched = f"{bound}{row['steps_to_match']:.1f}"
            lines.append(f"| {arm} | {row['seed']} | {100 * row['accuracy']:.1f} % | {matched} | {saving} |")
    return "\n".join(lines)


def plot(documents: list[dict], path: Path) -> None:
    """Held-out accuracy against the RL step, vanilla and every arm (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for doc in documents:
        for arm, curve in doc["curves"].items():
            style = {"color": "black", "linewidth": 2} if arm == "vanilla" else {}
            axes.plot(
                [p[0] for p in curve], [p[1] for p in curve], label=f"{arm} (seed {doc['seed']})", **style
            )
    axes.set_xlabel("RL step")
    axes.set_ylabel("held-out accuracy (greedy)")
    axes.set_title("SmolLM2-135M-Instruct, LoRA GRPO (TRL)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
