"""``--format adapter``: the extrapolated model as a PEFT LoRA adapter on the run's base model.

For a LoRA run, Ŵ = W_0 + s·B_c A_c + Δ, where Δ = α·T̂ is itself low rank (rank 1 for ``next`` and
``linear-rank1``, ≤ 2r for ``linear-full``). It is therefore exactly a LoRA adapter of rank r + q
per module: the last checkpoint's factors with the added delta's q factors appended,

    non-transposed (Linear):          B' = [B_c, L/s],  A' = [A_c; Rᵀ]
    transposed (Conv1D, Embedding):   B' = [B_c, R],    A' = [A_c; (L/s)ᵀ]

where Δ = L Rᵀ in the base weight's orientation and s is the module's own PEFT scaling, kept
unchanged through ``alpha_pattern`` (α' = s·r' or s·√r' under rsLoRA) so that resuming training sees
the same parametrisation, the same effective learning rate, and B_c, A_c bit-for-bit.
``rank_pattern``/``alpha_pattern`` name every module by its full path, and replace the original
patterns, because PEFT takes the first pattern whose regex matches. Every other tensor of the
checkpoint's adapter file (``modules_to_save``, saved embeddings, biases) is copied bit-for-bit.

Loaded with ``PeftModel.from_pretrained(base, out, is_trainable=True)`` it gives the merged output's
weights (tested against PEFT's own ``merge_and_unload``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nexttools.checkpoints.adapter import AdapterCheckpoint, LoraModule
from nexttools.errors import UserError
from nexttools.lowrank import LowRankFactors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter file under ``folder``, as stored (adapters are small: MBs, not GBs)."""
    if (folder / ADAPTER_WEIGHTS).is_file():
        return load_file(folder / ADAPTER_WEIGHTS)
    if (folder / "adapter_model.bin").is_file():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{folder}: no {ADAPTER_WEIGHTS} or adapter_model.bin")


def module_path(name: str) -> str:
    """PEFT's module key of a base weight: ``model.layers.0.self_attn.q_proj.weight`` -> ``...q_proj``."""
    return name.removesuffix(".weight")


def _alpha_for(scaling: float, rank: int, rslora: bool) -> float:
    """The ``lora_alpha`` that gives ``scaling`` at ``rank`` (alpha/r, or alpha/√r under rsLoRA)."""
    return scaling * (math.sqrt(rank) if rslora else rank)


def extended_factors(
    module: LoraModule, lora_a: torch.Tensor, lora_b: torch.Tensor, added: LowRankFactors
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of ``module`` with the added delta ``added`` (base orientation) appended.

    ``lora_a`` is (r, n_a) and ``lora_b`` (n_b, r) as stored; the results are (r+q, n_a) and
    (n_b, r+q) in the stored dtype. The appended factors are computed in float32.
    """
    left = added.left.float() / module.scaling
    right = added.right.float()
    new_a, new_b = (left.T, right) if module.transposed else (right.T, left)
    if new_a.shape[1] != lora_a.shape[1] or new_b.shape[0] != lora_b.shape[0]:
        raise ValueError(f"{module.name}: added delta {tuple(added.shape)} does not fit its LoRA factors")
    return (
        torch.cat([lora_a, new_a.to(lora_a.dtype)], dim=0),
        torch.cat([lora_b, new_b.to(lora_b.dtype)], dim=1),
    )


def adapter_config(
    adapter: AdapterCheckpoint, added_ranks: Mapping[str, int], base_id: str | None
) -> dict[str, Any]:
    """The output ``adapter_config.json``: the checkpoint's, with per-module rank r + q, same scaling."""
    config = dict(adapter.config)
    rslora = bool(config.get("use_rslora", False))
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, module in adapter.modules.items():
        rank = module.rank + added_ranks.get(name, 0)
        rank_pattern[module_path(name)] = rank
        alpha_pattern[module_path(name)] = _alpha_for(module.scaling, rank, rslora)
    config["rank_pattern"] = rank_pattern
    config["alpha_pattern"] = alpha_pattern
    if base_id:
        config["base_model_name_or_path"] = base_id
    return config


def build_adapter(
    adapter: AdapterCheckpoint,
    added: Mapping[str, LowRankFactors],
    *,
    dtype: torch.dtype | None,
    base_id: str | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The output adapter's tensors (key -> tensor, as PEFT saves them) and its ``adapter_config.json``.

    Args:
        adapter: the run's last checkpoint (W_c = base + its LoRA delta).
        added: module name -> the added delta α·T̂ as factors (left (rows, q), right (cols, q)), in
            the base weight's orientation; modules not in it keep their factors.
        dtype: cast the floating tensors to this dtype (``--dtype``), or keep the checkpoint's.
        base_id: Hub id to record as ``base_model_name_or_path`` (None keeps the checkpoint's).
    """
    tensors = _read_adapter_tensors(adapter.ref.path)
    for name, factors in added.items():
        module = adapter.modules[name]
        if factors.rank == 0:
            continue
        tensors[module.key_a], tensors[module.key_b] = extended_factors(
            module, tensors[module.key_a], tensors[module.key_b], factors
        )
    if dtype is not None:
        tensors = {key: t.to(dtype) if t.is_floating_point() else t for key, t in tensors.items()}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"the extrapolated adapter has non-finite values in {key}; nothing was written")
    config = adapter_config(adapter, {name: factors.rank for name, factors in added.items()}, base_id)
    return tensors, config


def save_adapter(folder: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[str]:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (as PEFT does) into ``folder``."""
    save_file(
        {key: t.contiguous() for key, t in tensors.items()},
        folder / ADAPTER_WEIGHTS,
        metadata={"format": "pt"},
    )
    (folder / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
