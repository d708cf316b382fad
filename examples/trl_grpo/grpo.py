"""Steps 2 and 4: LoRA GRPO with TRL's ``GRPOTrainer``, checkpoints written exactly as TRL writes them.

One function covers the three ways an RL run starts in this example:

- from the SFT model (or from a *merged* extrapolated model) with a fresh LoRA (``peft_config``);
- from an extrapolated *adapter* output, ``PeftModel.from_pretrained(base, adapter, is_trainable=True)``,
  which keeps training the extrapolated LoRA itself.

The learning rate is constant (no warm-up, no decay), so that the first 150/400 of a vanilla run
*is* the 150-step run that NExt extrapolates from (a decaying schedule would make them differ).
``checkpoint-N/`` folders are the trainer's own (adapter, optimizer, scheduler, RNG, trainer_state).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from examples.trl_grpo.task import ANSWER_TOKENS, Problem, is_correct

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class GrpoSettings:
    """RL hyper-parameters shared by every run of the protocol (vanilla, NExt and baselines alike).

    ``prompts_per_step * generations`` completions make one optimiser step (one "RL step").
    """

    learning_rate: float = 1.5e-3
    prompts_per_step: int = 32
    generations: int = 8
    temperature: float = 1.0
    rank: int = 8
    alpha: int = 16  # alpha != rank, so that a LoRA scaling bug downstream cannot hide


def lora_config(settings: GrpoSettings) -> object:
    """The PEFT ``LoraConfig`` of every fresh adapter: all 7 projections, r and alpha from ``settings``."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )


def grpo_config(
    out_dir: Path,
    *,
    steps: int,
    save_every: int,
    learning_rate: float,
    prompts_per_step: int,
    generations: int,
    completion_tokens: int,
    temperature: float,
    seed: int,
    logging_steps: int,
) -> Any:
    """The examples' ``GRPOConfig``: constant LR, β = 0 (no reference model), float32, CPU unless a
    GPU is there, a checkpoint every ``save_every`` steps."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out_dir),
        max_steps=steps,
        save_strategy="steps",
        save_steps=save_every,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=prompts_per_step * generations,
        num_generations=generations,
        max_completion_length=completion_tokens,
        temperature=temperature,
        beta=0.0,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=logging_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def timed_train(trainer: Any, attach: Sequence[Callable[[Any], object]], resume_from: Path | None) -> float:
    """Call each hook of ``attach`` with ``trainer``, train (resuming ``resume_from`` in place when
    given), and return the seconds the training loop took (model loading excluded)."""
    for hook in attach:
        hook(trainer)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    return time.monotonic() - started


def train_grpo(
    model_dir: Path,
    out_dir: Path,
    problems: Sequence[Problem],
    *,
    steps: int,
    save_every: int,
    seed: int,
    settings: GrpoSettings,
    adapter_dir: Path | None = None,
    resume_from: Path | None = None,
    attach: Sequence[Callable[[Any], object]] = (),
) -> float:
    """Run ``steps`` GRPO steps from ``model_dir`` and write ``out_dir/checkpoint-N`` every ``save_every``.

    Args:
        model_dir: HF model folder (fp32) the run starts from; a fresh LoRA is put on it unless
            ``adapter_dir`` is given, in which case that PEFT adapter is loaded trainable and trained on.
        steps: the run's last global step (with ``resume_from``, counted from the run's start).
        resume_from: an HF Trainer ``checkpoint-N/`` to resume **in place**: its adapter, optimizer,
            scheduler, RNG and data position, on top of ``model_dir`` (the run's base, or a new base
            written by ``nexttools extrapolate --format base``); new checkpoints go to ``out_dir``.
        problems: the RL prompt pool (never the held-out set); shuffled by the trainer with ``seed``.
        attach: called with the trainer before training (e.g. ``JumpCallback(...).attach``).

    Returns the seconds the training loop took (model loading excluded).
    """
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import GRPOTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    eos_id = tokenizer.eos_token_id

    def exact_match(completion_ids: list[list[int]], answer: list[str], **_: object) -> list[float]:
        """Verifiable reward: 1.0 for exactly the sum's three digits then eos, else 0.0."""
        return [
            float(is_correct(ids, ans, vocab, eos_id))
            for ids, ans in zip(completion_ids, answer, strict=True)
        ]

    dataset = Dataset.from_dict(
        {"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]}
    )
    args = grpo_config(
        out_dir,
        steps=steps,
        save_every=save_every,
        learning_rate=settings.learning_rate,
        prompts_per_step=settings.prompts_per_step,
        generations=settings.generations,
        completion_tokens=ANSWER_TOKENS,
        temperature=settings.temperature,
        seed=seed,
        logging_steps=max(steps, 1),
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if adapter_dir is None:
        peft_config = lora_config(settings)
    else:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_match,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    return timed_train(trainer, attach, resume_from)
