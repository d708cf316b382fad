"""Build a small, realistic LoRA RL run on disk, with no network.

The run is what a user's TRL/HF-Trainer job leaves behind: a base model folder saved with
``save_pretrained`` (tiny Llama, tokenizer, generation config) and ``checkpoint-N/`` folders
holding real PEFT adapters (``PeftModel.save_pretrained``) plus ``trainer_state.json``.

The adapters follow a smooth *nonlinear* trajectory, like the ones NExt models: in every module
the dominant direction of ΔW_t rotates at a constant angular speed while its magnitude saturates
(1 − e^{−t/τ}); two weaker directions grow linearly; and the factors are mixed by a random
invertible matrix per checkpoint, because LoRA factors are never unique (B A = (B M)(M⁻¹ A)).

Used by ``make demo``, the tests and the benchmarks::

    python -m examples.demo_run OUT_DIR            # OUT_DIR/base, OUT_DIR/run, OUT_DIR/future.safetensors
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

DEMO_FUTURE_STEP = 200
"""The step at which the demo writes the run's own future, the reference of its toy eval."""
VOCAB = [chr(c) for c in range(32, 127)]  # printable ASCII, one token per character
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class DemoRun:
    """Paths of a built run: ``base`` is the step-0 model, ``run`` holds ``checkpoint-N/``."""

    base: Path
    run: Path
    steps: tuple[int, ...]


def save_tiny_llama(
    out: Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised tiny Llama (with a character tokenizer) to ``out``.

    Args:
        out: folder to create; written with ``save_pretrained``.
        dtype: dtype of the saved weights (the "base dtype" nexttools must keep).
        tie_word_embeddings: tie ``lm_head`` to ``embed_tokens`` as Qwen2.5-1.5B does.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=16
    )
    model.save_pretrained(out)
    _save_char_tokenizer(out)
    return out


def _save_char_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(out)


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def _rotating_factors(
    u_basis: torch.Tensor,
    v_basis: torch.Tensor,
    rank: int,
    step: int,
    tau: float,
    omega: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical (B ``(out, rank)``, A ``(rank, in)``), float64, at ``step``: the dominant direction
    (u0, u1 / v0, v1 planes) rotates at ``omega`` rad/step with magnitude ``scale``·(1 − e^{−step/τ});
    two weaker directions (u2, u3) grow linearly."""
    angle = omega * step
    magnitude = scale * (1.0 - math.exp(-step / tau))
    u = math.cos(angle) * u_basis[:, 0] + math.sin(angle) * u_basis[:, 1]
    v = math.cos(0.7 * angle) * v_basis[:, 0] + math.sin(0.7 * angle) * v_basis[:, 1]
    weak = 0.15 * scale * step / 150.0
    cols_b = [magnitude * u, weak * u_basis[:, 2], 0.5 * weak * u_basis[:, 3]]
    rows_a = [v, v_basis[:, 2], v_basis[:, 3]]
    b = torch.zeros(u_basis.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, v_basis.shape[0], dtype=torch.float64)
    for j, (col, row) in enumerate(zip(cols_b, rows_a, strict=True)):
        if j < rank:
            b[:, j], a[j] = col, row
    return b, a


def trajectory_factors(
    shape: tuple[int, int], rank: int, step: int, generator_seed: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (B: (out, rank), A: (rank, in)) of one module at ``step``, float64.

    s·B·A equals the module's ΔW at ``step``; the same ``generator_seed`` gives the same module.
    """
    out_dim, in_dim = shape
    g = torch.Generator().manual_seed(generator_seed)
    u_basis = _orthonormal(out_dim, 4, g)  # u0, u1 span the rotation plane; u2, u3 weak directions
    v_basis = _orthonormal(in_dim, 4, g)
    tau = 40.0 + 80.0 * torch.rand((), generator=g).item()  # saturation time, in steps
    omega = 0.004 + 0.008 * torch.rand((), generator=g).item()  # rotation speed, radians per step
    scale = 0.02 + 0.02 * torch.rand((), generator=g).item()

    mix_seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
    b, a = _rotating_factors(u_basis, v_basis, rank, step, tau, omega, scale)
    # Non-canonical factors, as an optimiser leaves them: B M, M⁻¹ A with a well-conditioned M.
    mixer = torch.Generator().manual_seed(mix_seed + step)
    m = torch.eye(rank, dtype=torch.float64) + 0.3 * torch.randn(
        rank, rank, generator=mixer, dtype=torch.float64
    )
    return (b @ m) / scaling, torch.linalg.solve(m, a)


def steady_factors(
    shape: tuple[int, int], rank: int, step: int, generator_seed: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's run: the same kind of trajectory as :func:`trajectory_factors`, but steadier, as a
    run in a consistent phase is (the regime where a jump pays): the dominant direction rotates slowly
    while its magnitude is still growing (saturation time 300–600 steps), and the factors' gauge M
    drifts continuously with the step, as an optimiser leaves it, instead of jumping per checkpoint.
    """
    out_dim, in_dim = shape
    g = torch.Generator().manual_seed(generator_seed)
    u_basis = _orthonormal(out_dim, 4, g)
    v_basis = _orthonormal(in_dim, 4, g)
    tau = 300.0 + 300.0 * torch.rand((), generator=g).item()
    omega = 0.0005 + 0.001 * torch.rand((), generator=g).item()
    scale = 0.05 + 0.05 * torch.rand((), generator=g).item()
    drift = 0.05 * torch.randn(rank, rank, generator=g, dtype=torch.float64)
    b, a = _rotating_factors(u_basis, v_basis, rank, step, tau, omega, scale)
    m = torch.eye(rank, dtype=torch.float64) + drift * (step / 150.0)
    return (b @ m) / scaling, torch.linalg.solve(m, a)


Factors = Callable[[tuple[int, int], int, int, int, float], tuple[torch.Tensor, torch.Tensor]]
"""(shape, rank, step, generator_seed, scaling) -> (B, A), as :func:`trajectory_factors`."""


def _peft_at(
    base_model: torch.nn.Module, lora_config: object, step: int, seed: int, factors: Factors
) -> torch.nn.Module:
    """A fresh PEFT wrap of ``base_model`` with every LoRA module set to ``factors`` at ``step``."""
    import copy

    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base_model), copy.deepcopy(lora_config))
    with torch.no_grad():
        for index, (_, module) in enumerate(sorted(peft_model.named_modules(), key=lambda item: item[0])):
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            lora_a = module.lora_A["default"].weight
            lora_b = module.lora_B["default"].weight
            b, a = factors(
                (lora_b.shape[0], lora_a.shape[1]),
                lora_a.shape[0],
                step,
                seed * 1000 + index,
                module.scaling["default"],
            )
            lora_b.copy_(b.to(lora_b.dtype))
            lora_a.copy_(a.to(lora_a.dtype))
    return peft_model


def save_lora_checkpoint(
    base_model: torch.nn.Module,
    lora_config: object,
    step: int,
    out: Path,
    seed: int,
    factors: Factors = trajectory_factors,
) -> None:
    """Set every LoRA module of a fresh PEFT wrap of ``base_model`` to the trajectory at ``step`` and save.

    Writes ``out/adapter_model.safetensors``, ``out/adapter_config.json`` (PEFT) and a TRL-style
    ``out/trainer_state.json`` whose ``global_step`` is ``step``.
    """
    peft_model = _peft_at(base_model, lora_config, step, seed, factors)
    peft_model.save_pretrained(out)
    state = {"global_step": step, "epoch": step / 150.0, "max_steps": 400, "log_history": []}
    (out / "trainer_state.json").write_text(json.dumps(state, indent=2))


def build_demo_run(
    out: Path,
    *,
    steps: tuple[int, ...] = tuple(range(10, 151, 10)),
    rank: int = 8,
    alpha: int = 16,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    base_dtype: torch.dtype = torch.float32,
    factors: Factors = trajectory_factors,
    future_step: int | None = None,
) -> DemoRun:
    """Build ``out/base`` (tiny Llama) and ``out/run/checkpoint-N`` for every N in ``steps``.

    The LoRA targets q, k, v, o, gate, up and down with ``alpha != rank`` so that a scaling bug
    cannot hide. Each checkpoint is a real ``PeftModel.save_pretrained`` output; ``factors`` sets the
    trajectory (:func:`trajectory_factors` by default). With ``future_step``, also writes
    ``out/future.safetensors``: the trained modules' merged weights (PEFT ``merge_and_unload``) at
    that step, the reference of ``examples/toy_eval.py``.
    """
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    out = Path(out)
    base = save_tiny_llama(out / "base", tie_word_embeddings=tie_word_embeddings, dtype=base_dtype, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    )
    run = out / "run"
    for step in steps:
        save_lora_checkpoint(model, config, step, run / f"checkpoint-{step}", seed, factors)
    if future_step is not None:
        save_merged_modules(model, config, future_step, out / "future.safetensors", seed, factors)
    return DemoRun(base=base, run=run, steps=tuple(steps))


def save_merged_modules(
    base_model: torch.nn.Module, lora_config: object, step: int, out: Path, seed: int, factors: Factors
) -> Path:
    """Save the LoRA-targeted weights of the run at ``step``, merged by PEFT, as one safetensors file."""
    from safetensors.torch import save_file

    merged = _peft_at(base_model, lora_config, step, seed, factors).merge_and_unload()
    targets = tuple(f"{name}.weight" for name in lora_config.target_modules)  # type: ignore[attr-defined]
    tensors = {k: v.contiguous() for k, v in merged.state_dict().items() if k.endswith(targets)}
    save_file(tensors, str(out))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m examples.demo_run OUT_DIR")
    built = build_demo_run(Path(sys.argv[1]), future_step=DEMO_FUTURE_STEP, factors=steady_factors)
    print(f"base: {built.base}\nrun:  {built.run} ({len(built.steps)} checkpoints)")
    print(f"future: {built.base.parent / 'future.safetensors'} (the run at step {DEMO_FUTURE_STEP})")
