"""The two RL regimes of the in-place measurement: the start model and the GRPO settings of each.

- **sharpening** (the main one): a ≈0.6 M-parameter Llama (hidden 128, 4 layers) SFT'd to
  convergence on answers whose last digit is replaced by a random digit half the time. It knows the
  task (greedy accuracy ≈ 100 %) but hedges (sampled accuracy ≈ 0.55), and LoRA GRPO at lr 3e-5 with
  64 prompts × 8 sharpens its distribution: what RLVR is reported to do on pretrained LLMs, and the
  one regime where the pilots saw an in-place jump pay (``shared/reference/method-findings.md`` §2).
- **smooth**: the original toy start (≈0.1 M, hidden 64, 2 layers, SFT'd only to 15 % greedy
  accuracy on clean answers), LoRA GRPO at lr 3e-4 with 128 prompts × 8.
"""

from __future__ import annotations

from dataclasses import dataclass

from examples.trl_grpo.grpo import GrpoSettings


@dataclass(frozen=True)
class Regime:
    """A start model (architecture and SFT) and the GRPO settings of every run from it."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    sft_target: float  # stop SFT at this greedy accuracy on a validation slice of the training pool
    sft_max_steps: int
    noisy_last_digit: float  # probability that an SFT answer's last digit is a uniformly random digit
    settings: GrpoSettings


REGIMES = {
    "sharpening": Regime(
        name="sharpening",
        hidden_size=128,
        intermediate_size=256,
        num_layers=4,
        sft_target=0.99,
        sft_max_steps=4000,
        noisy_last_digit=0.5,
        settings=GrpoSettings(learning_rate=3e-5, prompts_per_step=64, generations=8),
    ),
    "smooth": Regime(
        name="smooth",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        sft_target=0.15,
        sft_max_steps=3000,
        noisy_last_digit=0.0,
        settings=GrpoSettings(learning_rate=3e-4, prompts_per_step=128, generations=8),
    ),
}
