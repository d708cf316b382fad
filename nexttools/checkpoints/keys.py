"""Adapter tensor keys in base-model terms, whichever writer produced them (PEFT, verl, accelerate)."""

from __future__ import annotations

import re

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)[.]")
"""Matches the keys of LoRA factors (``...q_proj.lora_A.weight``, ``...lora_embedding_B.default``)."""

# Key segments after which PEFT (in memory, and verl's raw shards) puts the adapter name.
_ADAPTER_NAME_OWNERS = {
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "modules_to_save",
}


def normalise_key(key: str) -> str:
    """An adapter file key in base-model terms: no ``base_model.model.`` prefix, no adapter name segment.

    ``base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight`` ->
    ``model.layers.0.mlp.up_proj.lora_A.weight`` (the ``.default`` segment only appears in raw
    shards such as verl's; PEFT's own files drop it).
    """
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    kept = [
        part
        for index, part in enumerate(parts)
        if not (part == "default" and index > 0 and parts[index - 1] in _ADAPTER_NAME_OWNERS)
    ]
    return ".".join(kept)


def lora_module_paths(keys: list[str]) -> list[str]:
    """The module paths (``model.layers.0.self_attn.q_proj``) of the LoRA factors among ``keys``."""
    paths = {normalise_key(key) for key in keys if LORA_KEY.search(key)}
    return sorted(path[: path.rfind(".lora_")] for path in paths)
