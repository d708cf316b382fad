"""``--format adapter``: the extrapolated model as a PEFT LoRA adapter on the run's base model.

For a LoRA run, Ŵ = W_0 + s·B_c A_c + Δ, where Δ = α·T̂ is itself low rank (rank 1 for ``next`` and
``linear-rank1``, ≤ 2r for ``last-interval``, r for ``rl-extra``). It is therefore exactly a LoRA
adapter of rank r + q per module: the last checkpoint's factors with the added delta's q factors
appended,

    non-transposed (Linear):          B' = [B_c, L/s],  A' = [A_c; Rᵀ]
    transposed (Conv1D, Embedding):   B' = [B_c, R],    A' = [A_c; (L/s)ᵀ]

where Δ = L Rᵀ in the base weight's orientation and s is the module's own PEFT scaling, kept
unchanged through ``alpha_pattern`` (α' = s·r' or s·√r' under rsLoRA) so that resuming training sees
the same parametrisation and B_c, A_c bit-for-bit. A method that keeps the rank (``factor-linear``)
writes its own (A', B') instead, at rank r.

``rank_pattern``/``alpha_pattern`` name every module by its full path and replace the original
patterns (PEFT takes the first pattern whose regex matches). Serving engines (vLLM, SGLang,
TensorRT-LLM) read only the top-level ``r`` and ``lora_alpha``, so those are set to the new rank
(and the matching alpha when every module shares one scaling). Every other tensor of the
checkpoint's adapter file (``modules_to_save``, saved embeddings) is copied bit-for-bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nexttools.checkpoints.adapter import AdapterCheckpoint, LoraModule
from nexttools.errors import UserError
from nexttools.lowrank import LowRankFactors
from nexttools.manifest import Manifest
from nexttools.methods import Jump
from nexttools.outputs.base import OutputFormat, OutputPlan, OutputRequest, Weights
from nexttools.outputs.model_folder import tokenizer_files
from nexttools.outputs.recipes import KL_NOTE, code
from nexttools.outputs.side import copy_files, sizes_of
from nexttools.ranks import Ranks

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
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
    if len(set(rank_pattern.values())) == 1 and len(set(alpha_pattern.values())) == 1:
        config["r"] = next(iter(rank_pattern.values()))
        config["lora_alpha"] = next(iter(alpha_pattern.values()))
    else:  # serving engines size their slots from the top-level r: declare the largest
        config["r"] = max(rank_pattern.values())
    if base_id:
        config["base_model_name_or_path"] = base_id
    return config


def jumped_adapter(
    adapter: AdapterCheckpoint,
    jump: Jump,
    shifts: Callable[[str], LowRankFactors | None],
    *,
    dtype: torch.dtype | None,
    base_id: str | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The output adapter's tensors (key -> tensor, as PEFT saves them) and its ``adapter_config.json``.

    Args:
        adapter: the run's last checkpoint (W_c = base + its LoRA delta).
        jump: α·T̂ of every module: appended as extra rank, or, when the method keeps the rank,
            its own (A', B') in place of the checkpoint's.
        shifts: each module's base shift under the checkpoint (``OpenedRun.shift``; None: none),
            appended as extra rank too, so that the adapter on the original base gives W_c + α·T̂.
        dtype: cast the floating tensors to this dtype (``--dtype``), or keep the checkpoint's.
        base_id: Hub id to record as ``base_model_name_or_path`` (None keeps the checkpoint's).
    """
    tensors = read_adapter_tensors(adapter.ref.path)
    added_ranks: dict[str, int] = {}
    for name, module in adapter.modules.items():
        parts = [] if (shift := shifts(name)) is None else [shift]  # an adapter on W_0 carries them
        if jump.new_factors is not None:
            tensors[module.key_a], tensors[module.key_b] = jump.new_factors(name)
        else:
            jumped = jump.change(name)
            assert isinstance(jumped, LowRankFactors), "a LoRA run's jump is low rank"
            parts.append(jumped)
        if not parts:
            continue
        change = LowRankFactors(torch.cat([p.left for p in parts], 1), torch.cat([p.right for p in parts], 1))
        if change.rank:
            added_ranks[name] = change.rank
            tensors[module.key_a], tensors[module.key_b] = extended_factors(
                module, tensors[module.key_a], tensors[module.key_b], change
            )
    if dtype is not None:
        tensors = {key: t.to(dtype) if t.is_floating_point() else t for key, t in tensors.items()}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"the extrapolated adapter has non-finite values in {key}; nothing was written")
    return tensors, adapter_config(adapter, added_ranks, base_id)


def save_adapter(folder: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (as PEFT does) into ``folder``."""
    save_file(
        {key: t.contiguous() for key, t in tensors.items()},
        folder / ADAPTER_WEIGHTS,
        metadata={"format": "pt"},
    )
    (folder / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")


def adapter_bytes(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, int]:
    """Approximate sizes of the two adapter files (tensor bytes; the config's JSON)."""
    return {
        ADAPTER_WEIGHTS: sum(t.numel() * t.element_size() for t in tensors.values()),
        ADAPTER_CONFIG: len(json.dumps(dict(config), indent=2, sort_keys=True)) + 1,
    }


class Adapter(OutputFormat):
    name = "adapter"
    summary = "a PEFT LoRA adapter on the base, rank r+q (resume with a fresh optimizer)"
    lora_only = True

    def weights(self, run_kind: str) -> Weights:
        return "adapter"

    def plan(self, request: OutputRequest) -> OutputPlan:
        run = request.run
        last = run.last
        assert isinstance(last, AdapterCheckpoint)
        tensors, config = jumped_adapter(
            last,
            request.jump,
            lambda name: run.shift(run.rows - 1, name),
            dtype=request.dtype,
            base_id=request.base_id,
        )
        side = tokenizer_files(run.last_folder, run.base_path)
        dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())

        def write(folder: Path, ranks: Ranks) -> None:  # one small file: rank 0 writes it
            if not ranks.writer:
                return
            save_adapter(folder, tensors, config)
            copy_files(side, folder)

        files = adapter_bytes(tensors, config) | sizes_of(side)
        return OutputPlan(files, 1, dtype, write, adapter_rank=int(config["r"]))

    def load_text(self, manifest: Manifest, target: str) -> str:
        base = manifest.base_reference
        return "The adapter gives the extrapolated weights when loaded on its base model.\n\n" + code(
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto")\n'
            f'model = PeftModel.from_pretrained(base, "{target}")\n'
            "model = model.merge_and_unload()  # optional: plain transformers model with the same weights\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
        )

    def resume_text(self, manifest: Manifest, target: str) -> str:
        base = manifest.base_reference
        rank = manifest.adapter_rank or "r+1"
        return (
            "The adapter keeps training, with a **fresh optimizer** (its rank grew, so the run's Adam "
            "state no longer fits). For an in-place resume of the run's own optimizer, use "
            "`--format base`.\n\n"
            "- **TRL**:\n\n"
            + code(
                "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                "from trl import GRPOTrainer\n\n"
                f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto")\n'
                f'model = PeftModel.from_pretrained(base, "{target}", is_trainable=True)\n'
                "trainer = GRPOTrainer(model=model, ...)\n"
            )
            + "\n  Without `is_trainable=True` the adapter is frozen and, with β > 0, training is "
            "silently a no-op.\n"
            f"- **verl**: `actor_rollout_ref.model.path={base} "
            f"actor_rollout_ref.model.lora_adapter_path={target} "
            f"actor_rollout_ref.model.lora_rank={rank}` (at least the adapter's top-level `r` = {rank}: vLLM "
            "sizes its LoRA slots from `lora_rank` and reads only the top-level `r`).\n"
            "- **OpenRLHF**: has no option to continue an adapter: merge it "
            "(`merge_and_unload().save_pretrained(...)`) and pass that folder to "
            "`--actor.model_name_or_path`.\n\n"
            f"{KL_NOTE}\n"
        )
