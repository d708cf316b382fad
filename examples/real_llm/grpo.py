"""A real LoRA GRPO run on SmolLM2-135M-Instruct with TRL: two-digit addition, credit for the sum.

    python -m examples.real_llm.grpo MODEL OUT --steps 8 --save-every 2     # a short run
    python -m examples.real_llm.grpo --eval MODEL                           # held-out accuracy

The task is the one the model was tried on: "What is a + b? Reply with the number only.", in its own
chat template. The reward gives credit for the right sum wherever it stands as a number in a short
completion (the instruct model often explains first), so that the start is neither 0 nor 1.
``--eval`` prints the held-out accuracy (greedy, the same rule) of a merged model folder as its last
stdout line: the ``nexttools backtest --eval-cmd`` convention.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

COMPLETION_TOKENS = 24
HELDOUT = 32


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]


def problems(count: int, seed: int) -> list[Problem]:
    """``count`` distinct two-digit additions drawn with ``seed``."""
    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], count)
    return [Problem(f"What is {a} + {b}? Reply with the number only.", str(a + b)) for a, b in pairs]


def heldout(count: int = HELDOUT) -> list[Problem]:
    """The evaluation prompts (a seed the training pool never uses; disjoint from it)."""
    pool = {p.question for p in problems(256, seed=0)}
    return [p for p in problems(count + 256, seed=12345) if p.question not in pool][:count]


def has_answer(text: str, answer: str) -> bool:
    """The sum stands in ``text`` as a number of its own (not inside a longer one)."""
    return re.search(rf"(?<!\d){answer}(?!\d)", text) is not None


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


def reward(completions: Sequence[Any], answer: Sequence[str], **_: object) -> list[float]:
    """1.0 when the completion holds the right sum (:func:`has_answer`), else 0.0."""
    return [float(has_answer(_text(c), a)) for c, a in zip(completions, answer, strict=True)]


def train(
    model_dir: Path,
    out_dir: Path,
    *,
    steps: int,
    save_every: int,
    seed: int = 0,
    prompts_per_step: int = 4,
    generations: int = 4,
    learning_rate: float = 2e-4,
    resume_from: Path | None = None,
    attach: Sequence[Callable[[Any], object]] = (),
) -> float:
    """LoRA GRPO (r = 16 on every linear layer, β = 0) from ``model_dir``, ``checkpoint-N`` every
    ``save_every`` steps into ``out_dir``; ``resume_from`` resumes a checkpoint in place (its adapter,
    optimizer and data position on ``model_dir``). Returns the training loop's seconds."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from examples.trl_grpo.grpo import grpo_config, timed_train

    pool = problems(256, seed=0)
    dataset = Dataset.from_dict({"prompt": [p.messages for p in pool], "answer": [p.answer for p in pool]})
    args = grpo_config(
        out_dir,
        steps=steps,
        save_every=save_every,
        learning_rate=learning_rate,
        prompts_per_step=prompts_per_step,
        generations=generations,
        completion_tokens=COMPLETION_TOKENS,
        temperature=1.0,
        seed=seed,
        logging_steps=1,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir, padding_side="left"),
        peft_config=lora,
    )
    return timed_train(trainer, attach, resume_from)


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any, tasks: Sequence[Problem]) -> float:
    """Greedy held-out accuracy under :func:`has_answer`, in [0, 1]."""
    model.eval()
    texts = [
        tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in tasks
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=COMPLETION_TOKENS, do_sample=False)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(has_answer(c, p.answer) for c, p in zip(completions, tasks, strict=True)) / len(tasks)


def evaluate(model_dir: Path) -> float:
    """:func:`accuracy` of the model folder on the held-out prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return accuracy(model, tokenizer, heldout())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.real_llm.grpo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model", type=Path, help="HF model folder")
    parser.add_argument("out", type=Path, nargs="?", help="run folder (checkpoint-N/)")
    parser.add_argument("--eval", action="store_true", help="print the held-out accuracy of MODEL")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.eval:
        print(f"{evaluate(args.model):.6f}")
        return
    if args.out is None:
        parser.error("OUT is needed to train")
    train(args.model, args.out, steps=args.steps, save_every=args.save_every, seed=args.seed)


if __name__ == "__main__":
    main()
