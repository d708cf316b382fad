"""The fixed evaluation protocol: greedy decoding of every held-out prompt, exact-match accuracy.

Greedy (no sampling, no temperature), ``ANSWER_TOKENS`` new tokens at most, the whole held-out set,
float32. The same function scores every model of every method, so accuracies are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from examples.trl_grpo.task import ANSWER_TOKENS, Problem, is_correct


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, tokenizer: object, problems: Sequence[Problem], batch_size: int = 500
) -> float:
    """Fraction of ``problems`` answered exactly under greedy decoding, in [0, 1]."""
    return _correct(model, tokenizer, problems, batch_size, samples=1, do_sample=False) / len(problems)


def load_policy(model_dir: Path, adapter_dir: Path | None = None) -> torch.nn.Module:
    """The policy to evaluate: an HF model folder, with a PEFT adapter folder on top if given (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir)


@torch.no_grad()
def sampled_accuracy(
    model: torch.nn.Module,
    tokenizer: object,
    problems: Sequence[Problem],
    samples: int = 8,
    seed: int = 0,
    batch_size: int = 250,
) -> float:
    """avg@``samples``: the mean exact-match rate of ``samples`` completions per prompt at T = 1, in [0, 1].

    Plain ancestral sampling (no top-k, no top-p), as GRPO samples its rollouts. The generator is
    seeded with ``seed`` for every call, so every model is scored on the same random numbers and the
    paired differences between arms carry less sampling noise.
    """
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    correct = _correct(model, tokenizer, problems, batch_size, samples=samples, **sampling)
    return correct / (len(problems) * samples)


def _correct(
    model: torch.nn.Module,
    tokenizer: object,
    problems: Sequence[Problem],
    batch_size: int,
    samples: int,
    **decoding: object,
) -> int:
    """Exactly correct completions of ``problems``, ``samples`` per prompt, decoded with ``decoding``.

    All prompts have the same length (6 tokens), so batches need no padding or attention mask.
    """
    model.eval()
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    eos_id = tokenizer.eos_token_id
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(list(p.prompt)) for p in chunk])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            num_return_sequences=samples,
            max_new_tokens=ANSWER_TOKENS,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
            **decoding,
        )
        completions = out[:, ids.shape[1] :].tolist()
        answers = [p.answer for p in chunk for _ in range(samples)]
        correct += sum(is_correct(c, a, vocab, eos_id) for c, a in zip(completions, answers, strict=True))
    return correct
