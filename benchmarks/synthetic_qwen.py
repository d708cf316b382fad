"""Write a run shaped like Qwen2.5-1.5B-Instruct (or Llama-3-8B) + LoRA r=64, for the benchmarks.

The shapes are the real ones. Qwen2.5-1.5B: 28 layers; q, k, v, o, gate, up, down; hidden 1536,
intermediate 8960, 2 KV heads of 128 → kv 256; vocab 151936; tied embeddings; q/k/v biases.
Llama-3-8B (:data:`LLAMA3_8B`): 32 layers, hidden 4096, intermediate 14336, 8 KV heads → kv 1024,
vocab 128256, untied embeddings, no biases; the scale benchmark writes 4 of its layers. The values
are random: speed and memory do not depend on them, and the benchmarks never judge extrapolation
quality. Nothing is downloaded.

Layout written under ``out``:
    base/    config.json, generation_config.json, model.safetensors (bf16, ~3.1 GB)
    run/     checkpoint-{10,20,...}/adapter_model.safetensors (fp32), adapter_config.json,
             trainer_state.json
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 1536
INTERMEDIATE = 8960
KV = 256
LAYERS = 28
VOCAB = 151936


@dataclass(frozen=True)
class Shape:
    """A decoder's shapes; the defaults are Qwen2.5-1.5B's."""

    hidden: int = HIDDEN
    intermediate: int = INTERMEDIATE
    kv: int = KV
    layers: int = LAYERS
    vocab: int = VOCAB
    heads: int = 12
    tied: bool = True
    qkv_bias: bool = True

    @property
    def projections(self) -> dict[str, tuple[str, int, int]]:
        """name -> (block, out, in) of the seven LoRA targets."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        return {
            "q_proj": ("self_attn", h, h),
            "k_proj": ("self_attn", kv, h),
            "v_proj": ("self_attn", kv, h),
            "o_proj": ("self_attn", h, h),
            "gate_proj": ("mlp", i, h),
            "up_proj": ("mlp", i, h),
            "down_proj": ("mlp", h, i),
        }


QWEN = Shape()
PROJECTIONS = QWEN.projections
LLAMA3_8B = Shape(
    hidden=4096, intermediate=14336, kv=1024, layers=32, vocab=128256, heads=32, tied=False, qkv_bias=False
)


def model_config(shape: Shape, layers: int) -> dict:
    """config.json for ``shape`` with ``layers`` layers: Qwen2 for :data:`QWEN`, Llama otherwise."""
    if shape == QWEN:
        return qwen_config(layers)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv // (shape.hidden // shape.heads),
        "vocab_size": shape.vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": shape.tied,
        "hidden_act": "silu",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "dtype": "bfloat16",
    }


def qwen_config(layers: int = LAYERS) -> dict:
    """The config.json of Qwen2.5-1.5B-Instruct (the fields transformers needs), with ``layers`` layers."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "dtype": "bfloat16",
    }


def _embedding(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape.vocab, shape.hidden, generator=generator).to(torch.bfloat16)


def base_tensors(
    layers: int, generator: torch.Generator, shape: Shape = QWEN
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, bf16 tensor) of the base model, in checkpoint order."""
    yield "model.embed_tokens.weight", _embedding(shape, generator)
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for name, (block, out_dim, in_dim) in shape.projections.items():
            weight = torch.randn(out_dim, in_dim, generator=generator).mul_(0.02).to(torch.bfloat16)
            yield f"{prefix}.{block}.{name}.weight", weight
            if shape.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
                yield f"{prefix}.{block}.{name}.bias", torch.zeros(out_dim, dtype=torch.bfloat16)
        yield f"{prefix}.input_layernorm.weight", torch.ones(shape.hidden, dtype=torch.bfloat16)
        yield f"{prefix}.post_attention_layernorm.weight", torch.ones(shape.hidden, dtype=torch.bfloat16)
    yield "model.norm.weight", torch.ones(shape.hidden, dtype=torch.bfloat16)
    if not shape.tied:
        yield "lm_head.weight", _embedding(shape, generator)


def write_base(out: Path, layers: int = LAYERS, seed: int = 0, shape: Shape = QWEN) -> Path:
    """Write the bf16 base model folder (single ``model.safetensors``)."""
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = dict(base_tensors(layers, generator, shape))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model_config(shape, layers), indent=2))
    generation = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def write_run(
    out: Path,
    base: Path,
    *,
    layers: int = LAYERS,
    rank: int = 64,
    alpha: int = 128,
    steps: range | None = None,
    shape: Shape = QWEN,
) -> Path:
    """Write LoRA checkpoints (fp32 factors drifting smoothly with the step) in TRL layout."""
    steps = steps or range(10, 151, 10)
    generator = torch.Generator().manual_seed(1)
    start: dict[str, torch.Tensor] = {}
    drift: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name, (block, out_dim, in_dim) in shape.projections.items():
            key = f"base_model.model.model.layers.{i}.{block}.{name}"
            start[f"{key}.lora_A.weight"] = torch.randn(rank, in_dim, generator=generator) * 0.01
            start[f"{key}.lora_B.weight"] = torch.randn(out_dim, rank, generator=generator) * 1e-4
            drift[f"{key}.lora_A.weight"] = torch.randn(rank, in_dim, generator=generator) * 1e-4
            drift[f"{key}.lora_B.weight"] = torch.randn(out_dim, rank, generator=generator) * 1e-5
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(shape.projections),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "base_model_name_or_path": str(base),
    }
    for step in steps:
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        t = step / 10.0
        tensors = {key: start[key] + drift[key] * (t + 0.05 * t * t) for key in start}
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return out
