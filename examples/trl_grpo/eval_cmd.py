"""The eval command ``nexttools backtest`` runs on this example's models: avg@8 on the held-out set.

    nexttools backtest --eval-cmd "python -m examples.trl_grpo.eval_cmd {model}"

prints the sampled accuracy avg@8 (T = 1, the same seed for every model) of the merged model folder
as its last stdout line: the example's main metric, so that the advisor is scored on what the arms
are judged by.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from examples.trl_grpo.evaluate import load_policy, sampled_accuracy
from examples.trl_grpo.task import make_split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.trl_grpo.eval_cmd", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model", type=Path, help="merged HF model folder")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(sampled_accuracy(load_policy(args.model), tokenizer, make_split().heldout, samples=args.samples))


if __name__ == "__main__":
    main()
