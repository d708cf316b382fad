"""Write a run shaped like Qwen2.5-1.5B-Instruct + LoRA r=64, for the benchmarks (no download).

The shapes are the real ones (28 layers; q, k, v, o, gate, up, down; hidden 1536, intermediate 8960,
2 KV heads of 128 → kv 256; vocab 151936; tied embeddings; q/k/v biases). The values are random: speed
and memory do not depend on them, and the benchmarks never judge extrapolation quality.

Layout written under ``out``:
    base/    config.json, generation_config.json, model.safetensors (bf16, ~3.1 GB)
    run/     checkpoint-{10,20,...}/adapter_model.safetensors (fp32), adapter_config.json,
             trainer_state.json
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 1536
INTERMEDIATE = 8960
KV = 256
LAYERS = 28
VOCAB = 151936
PROJECTIONS: dict[str, tuple[str, int, int]] = {  # name -> (block, out, in)
    "q_proj": ("self_attn", HIDDEN, HIDDEN),
    "k_proj": ("self_attn", KV, HIDDEN),
    "v_proj": ("self_attn", KV, HIDDEN),
    "o_proj": ("self_attn", HIDDEN, HIDDEN),
    "gate_proj": ("mlp", INTERMEDIATE, HIDDEN),
    "up_proj": ("mlp", INTERMEDIATE, HIDDEN),
    "down_proj": ("mlp", HIDDEN, INTERMEDIATE),
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


def base_tensors(layers: int, generator: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, bf16 tensor) of the base model, in checkpoint order."""
    yield "model.embed_tokens.weight", torch.randn(VOCAB, HIDDEN, generator=generator).to(torch.bfloat16)
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for name, (block, out_dim, in_dim) in PROJECTIONS.items():
            weight = torch.randn(out_dim, in_dim, generator=generator).mul_(0.02).to(torch.bfloat16)
            yield f"{prefix}.{block}.{name}.weight", weight
            if name in ("q_proj", "k_proj", "v_proj"):
                yield f"{prefix}.{block}.{name}.bias", torch.zeros(out_dim, dtype=torch.bfloat16)
        yield f"{prefix}.input_layernorm.weight", torch.ones(HIDDEN, dtype=torch.bfloat16)
        yield f"{prefix}.post_attention_layernorm.weight", torch.ones(HIDDEN, dtype=torch.bfloat16)
    yield "model.norm.weight", torch.ones(HIDDEN, dtype=torch.bfloat16)


def write_base(out: Path, layers: int = LAYERS, seed: int = 0) -> Path:
    """Write the bf16 base model folder (single ``model.safetensors``, as Qwen2.5-1.5B ships)."""
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    save_file(dict(base_tensors(layers, generator)), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(qwen_config(layers), indent=2))
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
) -> Path:
    """Write LoRA checkpoints (fp32 factors drifting smoothly with the step) in TRL layout."""
    steps = steps or range(10, 151, 10)
    generator = torch.Generator().manual_seed(1)
    start: dict[str, torch.Tensor] = {}
    drift: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name, (block, out_dim, in_dim) in PROJECTIONS.items():
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
        "target_modules": sorted(PROJECTIONS),
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
