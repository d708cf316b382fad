"""Step 1: a tiny Llama built locally and briefly SFT'd on addition, so that it starts weak but learnable.

The model is ``examples.demo_run.save_tiny_llama`` (random init, one character per token), trained
with plain teacher forcing on ``prompt + answer + eos`` (loss on the answer tokens only). SFT stops
as soon as greedy accuracy on a validation slice *of the training pool* reaches ``target``, so the
RL run starts from a model that already has the format right and some of the arithmetic, which is
the regime RLVR is used in. The held-out set is never looked at here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from examples.demo_run import save_tiny_llama
from examples.trl_grpo.evaluate import accuracy
from examples.trl_grpo.task import ANSWER_TOKENS, Problem, Split


@dataclass(frozen=True)
class PretrainResult:
    """Where the SFT model was saved, after how many SFT steps, and its validation accuracy in [0, 1]."""

    path: Path
    steps: int
    val_accuracy: float


def pretrain(
    out: Path,
    split: Split,
    *,
    target: float = 0.15,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    max_steps: int = 3000,
    eval_every: int = 10,
    noisy_last_digit: float = 0.0,
    seed: int = 0,
) -> PretrainResult:
    """Build, SFT and ``save_pretrained`` the start model (fp32, with tokenizer) into ``out``.

    Stops at the first evaluation whose validation accuracy is >= ``target`` (or at ``max_steps``).
    With ``noisy_last_digit`` p, each training answer's last digit is replaced, with probability p and
    afresh at every batch, by a uniformly random digit: the model learns to hedge on it (the
    "sharpening" start of :mod:`examples.trl_grpo.regime`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tiny_llama(
        out, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers, seed=seed
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.generation_config.max_new_tokens = ANSWER_TOKENS
    validation, pool = split.train[:300], split.train[300:]

    def encode(problem: Problem) -> list[int]:
        text = problem.prompt + problem.answer
        return [*tokenizer.convert_tokens_to_ids(list(text)), tokenizer.eos_token_id]

    sequences = torch.tensor([encode(p) for p in pool])  # (N, 10): 6 prompt + 3 digits + eos
    labels = sequences.clone()
    labels[:, : len(pool[0].prompt)] = -100  # learn the answer, not the prompt
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    step, val_accuracy = 0, 0.0
    while step < max_steps:
        model.train()
        index = torch.randint(0, len(pool), (batch_size,), generator=generator)
        batch = sequences[index].clone()
        if noisy_last_digit > 0:
            noisy = torch.rand(batch_size, generator=generator) < noisy_last_digit
            digits = torch.randint(0, 10, (batch_size,), generator=generator)
            batch[noisy, -2] = torch.tensor(tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]))[
                digits[noisy]
            ]
        loss = model(input_ids=batch, labels=torch.where(labels[index] == -100, -100, batch)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % eval_every == 0:
            val_accuracy = accuracy(model, tokenizer, validation)
            if val_accuracy >= target:
                break
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return PretrainResult(path=out, steps=step, val_accuracy=val_accuracy)
