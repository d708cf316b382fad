"""The verifiable task: two-digit addition with fixed-width answers, and its exact checker.

A prompt is ``"AA+BB="`` with both operands zero-padded to two digits; the answer is the sum
zero-padded to three digits (``"07+45="`` -> ``"052"``), followed by the end-of-sequence token.
Every prompt is 6 tokens and every correct completion 4 tokens (3 digits + eos) under the
one-character-per-token tokenizer of ``examples/demo_run.py``, so no batch ever needs padding and
the reward can be checked on token ids, without decoding ambiguities.

The 10,000 problems are split once, by a fixed permutation, into a held-out set (never trained on,
by SFT or RL) and a training pool.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

ANSWER_TOKENS = 4  # 3 digits + eos: the completion budget of RL and of evaluation


@dataclass(frozen=True)
class Problem:
    """One addition problem: ``prompt`` ("AA+BB=") and ``answer`` ("SSS", three digits)."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a:02d}+{self.b:02d}="

    @property
    def answer(self) -> str:
        return f"{self.a + self.b:03d}"


@dataclass(frozen=True)
class Split:
    """Disjoint problem sets: ``heldout`` for evaluation only, ``train`` for SFT and RL prompts."""

    heldout: tuple[Problem, ...]
    train: tuple[Problem, ...]


def make_split(heldout_size: int = 500, seed: int = 1234) -> Split:
    """Split all 100 x 100 problems by a fixed permutation (the same for every run and seed)."""
    problems = [Problem(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(problems)
    return Split(heldout=tuple(problems[:heldout_size]), train=tuple(problems[heldout_size:]))


def completion_text(token_ids: Sequence[int], id_to_token: Sequence[str], eos_id: int) -> str:
    """The completion up to (not including) its first eos, as text; ``None``-free and exact.

    Token ids are mapped through the vocabulary directly (the character tokenizer's ``decode``
    joins tokens with spaces, and a space is itself a token).
    """
    chars: list[str] = []
    for token_id in token_ids:
        if token_id == eos_id:
            break
        chars.append(id_to_token[token_id])
    return "".join(chars)


def is_correct(token_ids: Sequence[int], answer: str, id_to_token: Sequence[str], eos_id: int) -> bool:
    """True iff the completion is exactly the answer's digits followed by eos (a missing eos is wrong)."""
    ids = list(token_ids)
    if eos_id not in ids:
        return False
    return completion_text(ids, id_to_token, eos_id) == answer
