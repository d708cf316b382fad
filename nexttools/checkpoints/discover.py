"""Find and order the checkpoints of a run, whatever trainer wrote them: the layout registry.

Each trainer has its own folder layout and its own record of the training step. :data:`LAYOUTS` has
one :class:`Layout` per layout: how its checkpoint folders are named, how a folder becomes a
:class:`CheckpointRef` (where the weights are, LoRA or full, the step) and what it skips. Discovery,
the "looked for" message and the README's layout table all come from it; adding a layout is one entry
plus a fixture test (``docs/extending.md``). This module only looks at names and small JSON files:
reading and validating the weights is :mod:`nexttools.checkpoints.adapter`, ``.verl_fsdp``,
``.dcp`` and ``.weights``.

Two more rules apply before the registry: a run folder that holds exactly one run folder of ms-swift
(``vN-YYYYMMDD-HHMMSS/``) or prime-rl (``broadcasts/``) is descended into; and the run folder itself
may be one adapter or model folder (layouts ``"adapter"`` / ``"hf-model"``), used only when it holds
no checkpoint folders. Every checkpoint is ``kind="lora"`` or ``kind="full"``; a run mixing both is
refused.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nexttools.checkpoints.dcp import DCP_FOLDER, is_dcp
from nexttools.checkpoints.verl_fsdp import LORA_META, is_verl_fsdp
from nexttools.checkpoints.weights import has_model_weights
from nexttools.console import warn
from nexttools.errors import UserError
from nexttools.options import MAX_STEP

Kind = Literal["lora", "full"]

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_SWIFT_RUN = re.compile(r"v\d+-\d{8}-\d{6}")
MERGER_TRAP_HINT = (
    "holds full weights and a lora_adapter/ folder (what `verl.model_merger merge` writes): the "
    "weights are the unmerged base, so the adapter in {adapter} is read instead"
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

    run = _descend(run)
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
    """Checkpoints among the direct sub-folders of ``run`` (first matching layout wins), and a reason
    for each one skipped."""
    found: list[CheckpointRef] = []
    skipped: list[str] = []
    for child in sorted(p for p in run.iterdir() if p.is_dir()):
        for layout in LAYOUTS:
            match = layout.pattern.fullmatch(child.name)
            if match and int(match["step"]) > MAX_STEP:
                skipped.append(f"{child.name}: a step beyond 2**62")
                break
            if match and layout.recognises(child):
                ref = layout.resolve(child, int(match["step"]), skipped)
                if ref is not None:
                    found.append(ref)
                break
    return found, skipped


def _descend(run: Path) -> Path:
    """The folder that holds the checkpoints: ``run``, or its one ms-swift ``vN-<date>/`` run folder,
    or prime-rl's ``broadcasts/``."""
    if (run / "broadcasts").is_dir() and not any(_scan_children(run)[0]):
        return run / "broadcasts"
    swift = sorted(p for p in run.iterdir() if p.is_dir() and _SWIFT_RUN.fullmatch(p.name))
    if len(swift) > 1 and not _scan_children(run)[0]:
        names = ", ".join(p.name for p in swift)
        raise UserError(f"{run} holds {len(swift)} ms-swift runs ({names}): pass the one to extract")
    if len(swift) == 1 and not _scan_children(run)[0]:
        return swift[0]
    return run


def _trl_checkpoint(folder: Path, number: int, skipped: list[str]) -> CheckpointRef | None:
    """``checkpoint-N/``: HF-Trainer style (a PEFT folder, or accelerate's FSDP sharded
    ``pytorch_model_fsdp_0/``), or LLaMA-Factory v1 when it has a ``model/`` sub-folder."""
    model = folder / "model"
    if model.is_dir() and (weights_kind(model) is not None or (folder / "metadata.json").is_file()):
        if not (folder / "CHECKPOINT_COMPLETE").is_file():
            skipped.append(f"{folder} (incomplete: no CHECKPOINT_COMPLETE marker)")
            return None
        step = _json_step(folder / "metadata.json", number)
        return _ref(model, step, "llamafactory-v1", skipped)
    if weights_kind(folder) is None and is_dcp(folder / DCP_FOLDER):
        step = _json_step(folder / "trainer_state.json", number)
        return CheckpointRef(step=step, path=folder / DCP_FOLDER, kind="lora", layout="accelerate-fsdp")
    return _ref(folder, _json_step(folder / "trainer_state.json", number), "trl", skipped)


def _verl_checkpoint(folder: Path, number: int, skipped: list[str]) -> CheckpointRef | None:
    """verl ``global_step_N/``, in this order: legacy ``actor/lora_adapter/``; the FSDP engine's shards
    with ``lora_train_meta.json``; Megatron-Bridge's ``actor/model/huggingface/adapter/``; the NExt
    paper's merged ``hf_model/``; HF weights in ``actor/huggingface/``."""
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
        (actor / "model" / "huggingface" / "adapter", "verl-megatron"),
        (folder / "hf_model", "next-paper"),
        (actor / "huggingface", "verl"),
        (folder, "step-folder"),
    ):
        kind = weights_kind(candidate)
        if kind is not None:
            return CheckpointRef(step=number, path=candidate, kind=kind, layout=layout)
    skipped.append(
        f"{folder} (no actor/lora_adapter/, FSDP shards or HF weights: export the checkpoint with "
        "`python -m verl.model_merger merge`)"
    )
    return None


def _prime_rl_checkpoint(folder: Path, number: int, skipped: list[str]) -> CheckpointRef | None:
    """prime-rl ``broadcasts/step_N/``: complete only once its ``STABLE`` marker is written."""
    if not (folder / "STABLE").is_file():
        skipped.append(f"{folder} (incomplete: no STABLE marker)")
        return None
    return _ref(folder, number, "prime-rl", skipped)


def _nemo_rl_checkpoint(folder: Path, number: int, skipped: list[str]) -> CheckpointRef | None:
    """NeMo-RL ``step_N/policy/weights/model/`` (``tmp_step_N/``, still being written, never matches)."""
    return _ref(folder / "policy" / "weights" / "model", number, "nemo-rl", skipped)


def _folder_checkpoint(layout: str) -> Callable[[Path, int, list[str]], CheckpointRef | None]:
    """A layout whose checkpoint folder holds the weights directly; the step is the folder's number."""

    def resolve(folder: Path, number: int, skipped: list[str]) -> CheckpointRef | None:
        return _ref(folder, number, layout, skipped)

    return resolve


@dataclass(frozen=True)
class Layout:
    """One trainer layout of the registry.

    ``pattern`` matches a checkpoint folder's name, with the step (or the number the step defaults
    to) in the group ``step``; ``recognises`` may look inside the folder to tell layouts with the same
    names apart; ``resolve`` turns the folder into a :class:`CheckpointRef` (or None, noting why in
    ``skipped``). ``trainers``, ``folder`` and ``step_source`` are the README table's columns.
    """

    name: str
    trainers: str
    folder: str
    step_source: str
    pattern: re.Pattern[str]
    resolve: Callable[[Path, int, list[str]], CheckpointRef | None]
    recognises: Callable[[Path], bool] = lambda folder: True

    @property
    def table_row(self) -> str:
        """This layout's row of the README's "Supported checkpoint layouts" table."""
        return f"| {self.trainers} | {self.folder} | {self.step_source} |"


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "trl",
        "TRL, HF Trainer, Unsloth, axolotl, LLaMA-Factory, ROLL, ms-swift "
        "(its `vN-<date>/` run folder is descended into)",
        "`checkpoint-N/` with `adapter_model.safetensors` (or `.bin`) and `adapter_config.json`, or full "
        "weights; FSDP `SHARDED_STATE_DICT`'s torch DCP `pytorch_model_fsdp_0/` (r and alpha from an "
        "`adapter_config.json` in `checkpoint-N/` or the run folder); `ref/`, DeepSpeed `global_stepN/` "
        "and `pissa_init/` are skipped; LLaMA-Factory v1's `checkpoint-N/model/` only with its "
        "`CHECKPOINT_COMPLETE` marker",
        "`trainer_state.json` `global_step` (v1: `metadata.json`), else N",
        re.compile(r"checkpoint-(?P<step>\d+)"),
        _trl_checkpoint,
    ),
    Layout(
        "openrlhf",
        "OpenRLHF",
        "`global_stepN_hf/` (written with `--ckpt.save_hf`)",
        "N",
        re.compile(r"global_step(?P<step>\d+)_hf"),
        _folder_checkpoint("openrlhf"),
    ),
    Layout(
        "verl",
        "verl (legacy workers, FSDP engine ≥ 0.8, Megatron-Bridge), EasyR1, the NExt paper's code",
        "`global_step_N/`: `actor/lora_adapter/`; or `actor/model_world_size_W_rank_R.pt` DTensor shards "
        "with `fsdp_config.json` and `lora_train_meta.json`; or `actor/model/huggingface/adapter/`; or "
        "the merged `hf_model/` beside `actor/`",
        "N",
        re.compile(r"global_step_(?P<step>\d+)"),
        _verl_checkpoint,
        lambda folder: (folder / "actor").is_dir() or (folder / "hf_model").is_dir(),
    ),
    Layout(
        "areal",
        "AReaL",
        "`epoch{E}epochstep{S}globalstep{G}/` holding the adapter or model",
        "G",
        re.compile(r"epoch\d+epochstep\d+globalstep(?P<step>\d+)"),
        _folder_checkpoint("areal"),
    ),
    Layout(
        "nemo-rl",
        "NeMo-RL (DTensor / Automodel)",
        "`step_N/policy/weights/model/` (`tmp_step_N/`, still being written, is skipped)",
        "N",
        re.compile(r"step_(?P<step>\d+)"),
        _nemo_rl_checkpoint,
        lambda folder: (folder / "policy" / "weights").is_dir(),
    ),
    Layout(
        "prime-rl",
        "prime-rl",
        "`broadcasts/step_N/` with its `STABLE` marker (pass the run folder or `broadcasts/`)",
        "N",
        re.compile(r"step_(?P<step>\d+)"),
        _prime_rl_checkpoint,
        lambda folder: (folder / "STABLE").is_file() or folder.parent.name == "broadcasts",
    ),
    Layout(
        "step-folder",
        "plain PEFT, full-weight runs",
        "`step_N/`, `step-N/`, `stepN/`, `global_stepN/` holding an adapter, or HF model folders "
        "(`model.safetensors` or a sharded index; `--base` is the step-0 model)",
        "N",
        re.compile(r"(?:global_)?step[_-]?(?P<step>\d+)"),
        _folder_checkpoint("step-folder"),
    ),
)
"""Every checkpoint layout, in the order they are tried on a folder name."""

LOOKED_FOR = "; ".join(f"{layout.folder} ({layout.trainers})" for layout in LAYOUTS) + (
    "; or the run folder itself holding an adapter or model"
)


def _merger_trap(folder: Path) -> Path | None:
    """The ``lora_adapter/`` inside or beside a folder of full weights (verl's model merger output)."""
    if weights_kind(folder) != "full":
        return None
    for adapter in (folder / "lora_adapter", folder.parent / "lora_adapter"):
        if adapter != folder and weights_kind(adapter) == "lora":
            return adapter
    return None


def _ref(folder: Path, step: int, layout: str, skipped: list[str]) -> CheckpointRef | None:
    adapter = _merger_trap(folder)
    if adapter is not None:
        warn(f"{folder} {MERGER_TRAP_HINT.format(adapter=adapter)}")
        folder = adapter
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
    number = next((int(m["step"]) for layout in LAYOUTS if (m := layout.pattern.fullmatch(run.name))), 0)
    step = _json_step(run / "trainer_state.json", number)
    adapter = _merger_trap(run)
    if adapter is not None:
        warn(f"{run} {MERGER_TRAP_HINT.format(adapter=adapter)}")
        return CheckpointRef(step=step, path=adapter, kind="lora", layout="adapter")
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
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise UserError(f"{path}: global_step must be an integer from 0 to 2**62, got {step!r}")
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
