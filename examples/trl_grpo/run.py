"""Run the TRL GRPO example end to end: SFT start model, vanilla LoRA-GRPO, nexttools, resumed GRPO, report.

    python -m examples.trl_grpo.run --out trl-grpo-run                      # `make example`: 1 seed, α = 1.5
    python -m examples.trl_grpo.run --out trl-grpo-run --seeds 0 1 2 \\
        --alphas 0.5 1 1.5 2 3 --results examples/trl_grpo/results         # the full measurement

``--out`` holds every model, run and store (resumable: re-running skips what is done); ``--results``
(default ``OUT/results``) receives the figures: summary.json / .md, curves.csv, the plot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from examples.trl_grpo.grpo import GrpoSettings
from examples.trl_grpo.pretrain import pretrain
from examples.trl_grpo.protocol import METHODS, Protocol, run_seed, seeds_done
from examples.trl_grpo.report import markdown_table, write_results
from examples.trl_grpo.task import make_split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.trl_grpo.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("trl-grpo-run"), help="working folder (resumable)")
    parser.add_argument("--results", type=Path, default=None, help="figures folder [default: OUT/results]")
    parser.add_argument("--budget", type=int, default=400, help="S, vanilla RL steps (a multiple of 40)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="RL seeds")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.5], help="extending coefficients α")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny model: 1 is fastest)")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    """Run the protocol for every seed, write the figures and return the summary document."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    protocol = Protocol(
        budget=args.budget,
        alphas=tuple(args.alphas),
        methods=tuple(args.methods),
        adapter_alpha=1.5 if 1.5 in args.alphas else args.alphas[0],
        settings=GrpoSettings(),
    )
    split = make_split()
    sft_dir = args.out / "sft-model"
    if not (sft_dir / "config.json").exists() or not (sft_dir / "tokenizer.json").exists():
        log("step 1: build a tiny Llama and SFT it on two-digit addition")
        result = pretrain(sft_dir, split)
        log(f"SFT stopped after {result.steps} steps, validation accuracy {100 * result.val_accuracy:.1f}%")
    for seed in args.seeds:
        run_seed(args.out / f"seed-{seed}", sft_dir, split, protocol, seed, log)
    summary = write_results(seeds_done(args.out, args.seeds), args.results or args.out / "results")
    print(markdown_table(summary))
    return summary


if __name__ == "__main__":
    main()
