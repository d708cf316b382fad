"""``adapter_config.json``: read it, and refuse every setting whose merge is not PEFT's additive LoRA.

PEFT merges a LoRA module as ``W0 + s·B·A``; DoRA, LoRA biases, raw-parameter (MoE) targets,
replicated layers, trainable tokens, LoRA variants and base-rewriting inits (PiSSA, OLoRA, ...) do
something else, so each is refused with one line naming the file and the field. ``rank_pattern`` and
``alpha_pattern`` are checked up front and resolved as PEFT's ``get_pattern_key`` does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nexttools.checkpoints.jsonfile import read_json_object
from nexttools.errors import UserError

CONFIG_FILE = "adapter_config.json"
# LoraConfig fields that switch on a LoRA variant whose merge is not W0 + s·B·A.
_VARIANT_FIELDS = (
    "use_bdlora",
    "alora_invocation_tokens",
    "velora_config",
    "kasa_config",
    "monteclora_config",
    "arrow_config",
    "megatron_config",
    "use_qalora",
)
# init_lora_weights values that rewrite the base to W0 - s·B0·A0. The other
# inits (True/False, "gaussian", "orthogonal", "eva", "mica") keep the base as it is.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read_config(path: Path) -> dict[str, Any]:
    return read_json_object(path, missing=f"{path.parent}: no {CONFIG_FILE} beside the adapter weights")


def refuse_unsupported(path: Path, config: dict[str, Any]) -> None:
    """Refuse, naming the field, every config whose merge is not PEFT's plain additive LoRA."""
    peft_type = str(config.get("peft_type") or "LORA")
    if peft_type.upper() != "LORA":
        raise UserError(f"{path}: peft_type={peft_type!r} is not supported (only LoRA adapters are)")
    reasons = {
        "use_dora": "DoRA rescales each row of W0 + ΔW, so its update is not additive",
        "lora_bias": "LoRA biases (lora_B.bias) are not supported",
        "target_parameters": "LoRA on raw parameters (MoE experts) is not supported",
        "layer_replication": "replicated layers cannot be mapped onto the base checkpoint",
        "trainable_token_indices": "trainable token rows are not supported",
    }
    reasons.update({field: "this LoRA variant's merge is not W0 + s·B·A" for field in _VARIANT_FIELDS})
    for field, why in reasons.items():
        if config.get(field):
            raise UserError(f"{path}: {field}={config[field]!r} is not supported ({why})")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise UserError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights, so these adapters are relative "
            "to a residual model; the initial adapter is needed: convert each checkpoint with PEFT's "
            "path_initial_model_for_weight_conversion (LLaMA-Factory: pissa_convert) and pass the "
            "converted adapters"
        )
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise UserError(
            f"{path}: lora_alpha={alpha!r} is not a usable alpha (verl's model merger writes 0): set the "
            "real lora_alpha in this file (verl records it in lora_train_meta.json or "
            "actor_rollout_ref.model.lora_alpha)"
        )
    _check_patterns(path, config)


def _check_patterns(path: Path, config: dict[str, Any]) -> None:
    """``rank_pattern``/``alpha_pattern`` map regular expressions to positive numbers (``UserError``)."""
    for field, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        pattern = config.get(field)
        if pattern in (None, {}):
            continue
        if not isinstance(pattern, dict):
            raise UserError(
                f"{path}: {field} must be a mapping of module patterns to values, got {pattern!r}"
            )
        for key, value in pattern.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as error:
                raise UserError(
                    f"{path}: {field} key {key!r} is not a valid regular expression ({error})"
                ) from None
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or value <= 0 or (kind is int and value != int(value)):
                raise UserError(f"{path}: {field}[{key!r}] = {value!r} is not a positive {kind.__name__}")


def pattern_value(pattern: Any, module_path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` lookup: the first key (dict order) whose ``(.*\\.)?(KEY)$`` matches wins."""
    if not isinstance(pattern, dict):
        return default
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default
