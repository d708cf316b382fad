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
    """Fraction of ``problems`` answered exactly under greedy decoding, in [0, 1].

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
            do_sample=False,
            max_new_tokens=ANSWER_TOKENS,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        completions = out[:, ids.shape[1] :].tolist()
        correct += sum(
            is_correct(c, p.answer, vocab, eos_id) for c, p in zip(completions, chunk, strict=True)
        )
    return correct / len(problems)


def load_policy(model_dir: Path, adapter_dir: Path | None = None) -> torch.nn.Module:
    """The policy to evaluate: an HF model folder, with a PEFT adapter folder on top if given (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir)
