"""Pieces of the resume recipes that several outputs' model cards share (facts as of TRL 1.16,
verl 0.9 and OpenRLHF 0.11; the README's resume section says the same)."""

from __future__ import annotations

from nexttools.manifest import Manifest

KL_NOTE = (
    "With a KL penalty (β > 0) the reference model is whatever model you pass: the KL anchor moves "
    "to this model, not the run's original base."
)


def lora_config(manifest: Manifest) -> str:
    """``LoraConfig(...)`` with the run's own r, lora_alpha, target_modules (and rsLoRA), as Python."""
    lora = manifest.lora or {}
    parts = [f"r={lora.get('r', '...')}", f"lora_alpha={lora.get('lora_alpha', '...')}"]
    targets = lora.get("target_modules")
    parts.append(f"target_modules={targets!r}" if targets else "target_modules=[...]")
    if lora.get("use_rslora"):
        parts.append("use_rslora=True")
    return f"LoraConfig({', '.join(parts)})"


def dtype_kwargs(manifest: Manifest) -> str:
    """TRL loads a model path in float32 unless told: the ``model_init_kwargs`` that keep the dtype."""
    return f'model_init_kwargs={{"dtype": "{manifest.dtype}"}}'


def last_checkpoint(manifest: Manifest) -> str:
    """The folder of the run's last checkpoint (what ``resume_from_checkpoint`` takes)."""
    return manifest.resume_from or manifest.checkpoints[-1].path


def code(text: str) -> str:
    return f"```python\n{text}```\n"
