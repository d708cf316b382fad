"""A gate from the ``backtest --eval-cmd`` convention: the live model, written merged into a scratch
folder, scored by the user's own eval command.

    gate = EvalCommandGate("python eval_gsm8k.py --model {model} --n 128", tokenizer)
    JumpCallback("nexttools-run", every=50, start=100, gate=gate).attach(trainer)

The command is the same one ``backtest`` runs, with the same rules (:mod:`nexttools.evaluation`: no
shell with a path in it unless ``shell``, ``{model}`` or ``$NEXTTOOLS_MODEL``, a time limit, the last
stdout line is the score, higher is better). The folder holds what a merged output holds: every
weight of the live model with each LoRA module's s·B·A added to its (possibly jump-shifted) frozen
base weight, the config and, when given, the tokenizer. The live model is only read: no merge and
unmerge (which would round its weights), so a gate that keeps a jump leaves the run as it was.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nexttools.evaluation import DEFAULT_TIMEOUT, EvalCommand, run_eval

_PEFT_PREFIX = "base_model.model."


def merged_state_dict(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The live PEFT ``model``'s weights as a plain model's state dict: each LoRA layer's weight is
    its base layer's plus its delta (PEFT's ``get_delta_weight``), LoRA tensors dropped, a
    ``modules_to_save`` module's trained copy in place of the original, names without PEFT's
    prefixes. Only the merged LoRA weights are new tensors; every other entry is the live tensor
    itself, to be read (saved), never written."""
    merged: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                deltas[name.removeprefix(_PEFT_PREFIX) + ".weight"] = module.get_delta_weight(adapter)
        for name, tensor in model.state_dict().items():
            if ".lora_" in name or ".original_module." in name:  # modules_to_save: the trained copy wins
                continue
            plain = name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
            plain = plain.replace(f".modules_to_save.{adapter}.", ".")
            value = tensor.detach()  # read only: no copy of a tensor the merge leaves as it is
            if plain in deltas:
                value = (value.float() + deltas[plain].float()).to(value.dtype)
            merged[plain] = value
    return merged


class EvalCommandGate:
    """A ``JumpCallback`` gate that scores the live model with an eval command (module docstring).

    ``tokenizer`` is saved beside the weights (a tokenizer or processor with ``save_pretrained``);
    ``shell`` and ``timeout`` are ``backtest``'s ``--eval-shell`` and ``--eval-timeout``.
    """

    def __init__(
        self, command: str, tokenizer: Any = None, *, shell: bool = False, timeout: float | None = None
    ) -> None:
        self.command = EvalCommand(command, shell, DEFAULT_TIMEOUT if timeout is None else timeout)
        self.tokenizer = tokenizer

    def __call__(self, model: Any) -> float:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        folder = Path(tempfile.mkdtemp(prefix="nexttools-gate-"))
        try:
            inner.save_pretrained(folder, state_dict=merged_state_dict(model))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(folder)
            return run_eval(self.command, folder, "the live model")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
