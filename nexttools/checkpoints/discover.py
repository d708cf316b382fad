"""Find and order the checkpoints of a run, whatever trainer wrote them.

Each trainer has its own folder layout and its own record of the training step; this module knows
them (``/work/shared/reference/checkpoint-formats.md`` §2-3) and turns a run folder into a sorted
list of :class:`CheckpointRef`. It only looks at names and small JSON files: reading and validating
the weights is :mod:`nexttools.checkpoints.adapter` and :mod:`nexttools.checkpoints.weights`.

Layouts (``layout`` value: folder, relative to the run folder):

- ``"trl"``: ``checkpoint-N/`` (TRL, HF Trainer, Unsloth, classic LLaMA-Factory); the step is
  ``trainer_state.json:global_step``, else N. Sub-folders (TRL's frozen ``ref/`` adapter,
  DeepSpeed's ``global_stepN/``) and run-level extras (LLaMA-Factory's ``pissa_init/``, the final
  model saved beside the checkpoints) are not checkpoints and are ignored.
- ``"llamafactory-v1"``: ``checkpoint-N/model/``, only when ``checkpoint-N/CHECKPOINT_COMPLETE``
  exists; the step is ``checkpoint-N/metadata.json:global_step``, else N.
- ``"verl"``: ``global_step_N/actor/lora_adapter/`` (legacy workers), or full weights in
  ``global_step_N/actor/huggingface/``; the step is N.
- ``"openrlhf"``: ``global_stepN_hf/``; the step is N.
- ``"step-folder"``: ``step_N/``, ``step-N/``, ``stepN/``, ``global_stepN/``, ``global_step_N/``
  holding the weights directly; the step is N.
- ``"adapter"`` / ``"hf-model"``: the run folder *is* one adapter / one HF model folder (used only
  when it holds no checkpoint folders); the step is ``trainer_state.json:global_step``, else a step
  in the folder name, else 0.

Every checkpoint is ``kind="lora"`` (``adapter_model.safetensors``, or ``adapter_model.bin``) or
``kind="full"`` (``model.safetensors`` or ``model.safetensors.index.json``); a run mixing both is
refused.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nexttools.checkpoints.verl_fsdp import LORA_META, is_verl_fsdp
from nexttools.checkpoints.weights import has_model_weights
from nexttools.console import warn
from nexttools.errors import UserError

Kind = Literal["lora", "full"]

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_TRL = re.compile(r"checkpoint-(\d+)")
_VERL = re.compile(r"global_step_(\d+)")
_OPENRLHF = re.compile(r"global_step(\d+)_hf")
_STEP_FOLDER = re.compile(r"(?:global_)?step[_-]?(\d+)")

LOOKED_FOR = (
    "checkpoint-N/ (TRL, HF Trainer, Unsloth, LLaMA-Factory), checkpoint-N/model/ with CHECKPOINT_COMPLETE "
    "(LLaMA-Factory v1), global_step_N/actor/lora_adapter/ or model_world_size_W_rank_R.pt with "
    "lora_train_meta.json (verl), global_stepN_hf/ (OpenRLHF), "
    "step_N/ step-N/ global_stepN/ folders, or the run folder itself, holding adapter_model.safetensors "
    "or .bin (LoRA) or model.safetensors or model.safetensors.index.json (full weights)"
)


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run.

    ``path`` is the folder that holds the weights (adapter folder or HF model folder), ``step`` the
    training step the trainer recorded, ``layout`` the trainer layout that matched (module docstring).
    """

    step: int
    path: Path
    kind: Kind
    layout: str


def weights_kind(folder: Path) -> Kind | None:
    """``"lora"`` if ``folder`` holds an adapter, ``"full"`` if it holds HF safetensors weights, else None."""
    if any((folder / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        return "lora"
    if has_model_weights(folder):
        return "full"
    return None


def discover_checkpoints(
    run: Path,
    *,
    steps: tuple[int | None, int | None] | None = None,
    every: int | None = None,
) -> list[CheckpointRef]:
    """The checkpoints of ``run``, sorted by step.

    Args:
        run: the run folder (or a single adapter / model folder).
        steps: ``(lo, hi)``, keep ``lo <= step <= hi``; either end may be None (open).
        every: keep the checkpoints whose *step value* is a multiple of ``every`` (``step % every == 0``),
            so that the selection does not depend on which other checkpoints happen to exist.

    Raises:
        UserError: missing folder, nothing recognisable (the message lists what was looked for), two
            checkpoints with the same step, LoRA and full-weight checkpoints mixed, a bad selection.
    """
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run}: no such folder")
    if not run.is_dir():
        raise UserError(f"{run}: not a folder (pass the run folder that holds the checkpoints)")
    if every is not None and every <= 0:
        raise UserError(f"--every must be a positive number of steps, got {every}")
    if steps is not None and None not in steps and steps[0] > steps[1]:  # type: ignore[operator]
        raise UserError(f"--steps {steps[0]}:{steps[1]} is empty (start after end)")

    found, skipped = _scan_children(run)
    if not found:
        single = _as_single_folder(run)
        if single is None:
            detail = f"; skipped: {', '.join(skipped)}" if skipped else ""
            raise UserError(f"{run}: no checkpoints found; looked for {LOOKED_FOR}{detail}")
        found = [single]
    for reason in skipped:
        warn(f"skipped {reason}")

    found.sort(key=lambda ref: ref.step)
    for before, after in itertools.pairwise(found):
        if before.step == after.step:
            raise UserError(f"{before.path} and {after.path} both hold step {after.step}; keep only one")

    selected = [ref for ref in found if _selected(ref.step, steps, every)]
    if not selected:
        raise UserError(
            f"{run}: no checkpoint left after selection {_selection_text(steps, every)} "
            f"(found steps {', '.join(str(ref.step) for ref in found)})"
        )
    kinds = {ref.kind: ref for ref in selected}
    if len(kinds) > 1:
        raise UserError(
            f"{run}: mixes LoRA and full-weight checkpoints ({kinds['lora'].path} is LoRA, "
            f"{kinds['full'].path} holds full weights); extract them as separate runs"
        )
    return selected


def _scan_children(run: Path) -> tuple[list[CheckpointRef], list[str]]:
    """Checkpoints among the direct sub-folders of ``run``, and a reason for each one skipped."""
    found: list[CheckpointRef] = []
    skipped: list[str] = []
    for child in sorted(p for p in run.iterdir() if p.is_dir()):
        name = child.name
        if match := _TRL.fullmatch(name):
            ref = _trl_checkpoint(child, int(match[1]), skipped)
        elif match := _OPENRLHF.fullmatch(name):
            ref = _ref(child, int(match[1]), "openrlhf", skipped)
        elif (match := _VERL.fullmatch(name)) and (child / "actor").is_dir():
            ref = _verl_checkpoint(child, int(match[1]), skipped)
        elif match := _STEP_FOLDER.fullmatch(name):
            ref = _ref(child, int(match[1]), "step-folder", skipped)
        else:
            continue
        if ref is not None:
            found.append(ref)
    return found, skipped


def _trl_checkpoint(folder: Path, number: int, skipped: list[str]) -> CheckpointRef | None:
    """``checkpoint-N/``: HF-Trainer style, or LLaMA-Factory v1 when it has a ``model/`` sub-folder."""
    model = folder / "model"
    if model.is_dir() and (weights_kind(model) is not None or (folder / "metadata.json").is_file()):
        if not (folder / "CHECKPOINT_COMPLETE").is_file():
            skipped.append(f"{folder} (incomplete: no CHECKPOINT_COMPLETE marker)")
            return None
        step = _json_step(folder / "metadata.json", number)
        return _ref(model, step, "llamafactory-v1", skipped)
    if weights_kind(folder) is None and (folder / "pytorch_model_fsdp_0").is_dir():
        raise UserError(
            f"{folder}: the adapter exists only as an FSDP sharded state dict (pytorch_model_fsdp_0/); "
            "train with fsdp_state_dict_type FULL_STATE_DICT so that checkpoints hold "
            "adapter_model.safetensors"
        )
    return _ref(folder, _json_step(folder / "trainer_state.json", number), "trl", skipped)


def _verl_checkpoint(folder: Path, number: int, skipped: list[str]) -> CheckpointRef | None:
    """verl ``global_step_N/``: legacy ``actor/lora_adapter/``, else HF weights in ``actor/huggingface/``."""
    actor = folder / "actor"
    if weights_kind(actor / "lora_adapter") is None and is_verl_fsdp(actor):
        if (actor / LORA_META).is_file():
            return CheckpointRef(step=number, path=actor, kind="lora", layout="verl-fsdp")
        raise UserError(
            f"{actor / LORA_META} is missing: a verl LoRA run's r and alpha live only there (a full-weight "
            "run's FSDP shards are not read: export them with `python -m verl.model_merger merge`)"
        )
    for candidate, layout in (
        (actor / "lora_adapter", "verl"),
        (actor / "huggingface", "verl"),
        (folder, "step-folder"),
    ):
        kind = weights_kind(candidate)
        if kind is not None:
            return CheckpointRef(step=number, path=candidate, kind=kind, layout=layout)
    skipped.append(
        f"{folder} (no actor/lora_adapter/ or HF weights in actor/huggingface/: export the FSDP shards with "
        "`python -m verl.model_merger merge`)"
    )
    return None


def _ref(folder: Path, step: int, layout: str, skipped: list[str]) -> CheckpointRef | None:
    kind = weights_kind(folder)
    if kind is None:
        skipped.append(f"{folder} (no adapter_model.safetensors/.bin or model.safetensors[.index.json])")
        return None
    return CheckpointRef(step=step, path=folder, kind=kind, layout=layout)


def _as_single_folder(run: Path) -> CheckpointRef | None:
    """The run folder itself as one checkpoint (an adapter or model folder passed directly)."""
    kind = weights_kind(run)
    if kind is None:
        return None
    number = 0
    for pattern in (_TRL, _OPENRLHF, _VERL, _STEP_FOLDER):
        if match := pattern.fullmatch(run.name):
            number = int(match[1])
            break
    step = _json_step(run / "trainer_state.json", number)
    return CheckpointRef(step=step, path=run, kind=kind, layout="adapter" if kind == "lora" else "hf-model")


def _json_step(path: Path, fallback: int) -> int:
    """``global_step`` from a trainer's JSON record, or ``fallback`` when the file or field is absent."""
    if not path.is_file():
        return fallback
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not valid JSON (it should record the checkpoint's global_step)") from error
    step = record.get("global_step") if isinstance(record, dict) else None
    if step is None:
        return fallback
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"{path}: global_step must be a non-negative integer, got {step!r}")
    return step


def _selected(step: int, steps: tuple[int | None, int | None] | None, every: int | None) -> bool:
    if steps is not None:
        lo, hi = steps
        if (lo is not None and step < lo) or (hi is not None and step > hi):
            return False
    return every is None or step % every == 0


def _selection_text(steps: tuple[int | None, int | None] | None, every: int | None) -> str:
    parts = []
    if steps is not None:
        parts.append(f"--steps {'' if steps[0] is None else steps[0]}:{'' if steps[1] is None else steps[1]}")
    if every is not None:
        parts.append(f"--every {every}")
    return " ".join(parts)
