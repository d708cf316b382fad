"""``extrapolate``: make the jump α·T̂ of a method and write it in an output format.

This module only orchestrates; the mathematics lives in the method (:mod:`nexttools.methods`), the
files in the output format (:mod:`nexttools.outputs`), the checked inputs in
:class:`~nexttools.run.OpenedRun`. The order of work is what makes a mistake cost nothing and keeps a
half-written output from ever looking whole: check the options, the store, the base's and the
checkpoints' fingerprints and the method/format combination first; let the method compute its
prediction (refused if not finite) and the output plan every file and its size (all shapes are in
the headers); only then stream into a hidden staging folder (:func:`nexttools.writer.staged_folder`),
write the model card and, last, the manifest, and rename the folder into place.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nexttools import __version__
from nexttools.base_shifts import save_shift
from nexttools.card import write_model_card
from nexttools.checkpoints.adapter import AdapterCheckpoint
from nexttools.console import console, warn
from nexttools.device import resolve_device
from nexttools.disk import human_bytes
from nexttools.errors import UserError
from nexttools.extrapolate_choice import Choice, check_jump_size, choose
from nexttools.jump_record import JumpEntry, record_jump
from nexttools.lowrank import LowRankFactors
from nexttools.manifest import BaseRecord, CheckpointRecord, Manifest, write_manifest
from nexttools.methods import METHODS, Jump, JumpRequest, Method, get_method
from nexttools.options import CheckedOptions, device_option, option, store_option, workdir_option
from nexttools.outputs import OUTPUTS, OutputFormat, OutputPlan, OutputRequest, get_output
from nexttools.ranks import Ranks, joined, together
from nexttools.records import StoreRecords
from nexttools.run import OpenedRun
from nexttools.store import open_store
from nexttools.verdict import warn_if_judged
from nexttools.workdir import Workdir
from nexttools.writer import check_destination, staged_folder

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
ALPHA_WARNING = 4.0  # the paper reports instability beyond this


@dataclass(frozen=True)
class ExtrapolateOptions(CheckedOptions):
    """Inputs of :func:`extrapolate`; each field is also its command-line option (:mod:`nexttools.options`).

    ``method`` and ``format`` name entries of the method and output registries. ``store``
    defaults to ``<workdir>/trajectory.h5``; ``out`` to :meth:`Workdir.output`; ``dtype``
    (``bfloat16``, ``float16``, ``float32``) to each source tensor's own dtype; ``max_shard_size``
    is in bytes.
    """

    alpha: float | None = option(
        None, "Extending coefficient α: Ŵ = W_c + α·T̂.  [default: backtest's, else 1.5]", kind="alpha"
    )
    method: str | None = option(
        None,
        "How T̂ is predicted (listed below).  [default: backtest's recommendation, else fit's best]",
        choices=lambda: tuple(METHODS),
    )
    format: str | None = option(
        None,
        "What is written (listed below).  [default: in place: base (LoRA), checkpoint, else merged]",
        choices=lambda: tuple(OUTPUTS),
    )
    force: bool = option(
        False, "Skip the check that refuses a jump larger than half its module's weight norm."
    )
    out: Path | None = option(
        None, "Output folder.  [default: <workdir>/extrapolated-alpha{α}[-{method}][-{format}]]"
    )
    dtype: str | None = option(None, "Output dtype.  [default: the base's]", choices=lambda: tuple(DTYPES))
    max_shard_size: int = option(
        5 * 10**9, "Largest safetensors shard in bytes (5GB, 500MB, 2GiB...).", kind="size"
    )
    overwrite: bool = option(False, "Replace an existing nexttools output at --out.")
    record: bool = option(
        False,
        "Record the jump in the workdir, for a run that resumes from this in-place output: its store "
        "stays one trajectory (the offline loop, docs/jumping.md).",
    )
    dry_run: bool = option(False, "Print what would be written (files, shards, bytes, dtype) and exit.")
    base_model_id: str | None = option(None, "Hub id of the base, for the model card's base_model.")
    workdir: Path = workdir_option()
    store: Path | None = store_option()
    device: str = device_option()
    command: str | None = None
    """The command line that asked for this output (the CLI records its own); the manifest and the
    model card show it."""


@dataclass(frozen=True)
class ExtrapolateSummary:
    """What :func:`extrapolate` wrote (or, with ``dry_run``, would write). ``files``: name -> bytes."""

    out: Path
    method: str
    format: str
    alpha: float
    k: int
    target_step: float
    dtype: str
    files: dict[str, int]
    shards: int
    untied_embeddings: bool
    dry_run: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def document(self) -> dict[str, Any]:
        """The ``extrapolate --json`` document."""
        return {
            "out": str(self.out),
            "method": self.method,
            "format": self.format,
            "alpha": self.alpha,
            "k": self.k,
            "target_step": self.target_step,
            "dtype": self.dtype,
            "shards": self.shards,
            "total_bytes": self.total_bytes,
            "files": self.files,
            "untied_embeddings": self.untied_embeddings,
            "dry_run": self.dry_run,
            "warnings": self.warnings,
        }


def _alpha_warning(alpha: float) -> list[str]:
    if alpha <= ALPHA_WARNING:
        return []
    message = f"α = {alpha:g} > {ALPHA_WARNING:g}: the NExt paper reports unstable models this far out"
    warn(message)
    return [message]


def _check_run_kind(run_kind: str, method: Method, output: OutputFormat) -> None:
    for what, flag in ((method, f"--method {method.name}"), (output, f"--format {output.name}")):
        if what.lora_only and run_kind != "lora":
            raise UserError(f"{flag} needs a LoRA run; this store holds a full-weight run")


def _looks_like_hub_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "/", "~")) or Path(text).exists():
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _base_id(options: ExtrapolateOptions, run: OpenedRun) -> tuple[str | None, list[str]]:
    """The base's Hub id (``--base-model-id``, else adapter_config.json / the store if they hold one)."""
    if options.base_model_id:
        return options.base_model_id, []
    named = run.last.base_model_name_or_path if isinstance(run.last, AdapterCheckpoint) else None
    for candidate in (named, run.store.base_model):
        if candidate and _looks_like_hub_id(candidate):
            return candidate, []
    message = (
        f"the base model is only known as the local path {run.base_path}; the model card will have no "
        "base_model (pass --base-model-id to name it)"
    )
    warn(message)
    return None, [message]


def _lora_facts(run: OpenedRun) -> dict[str, Any] | None:
    """The run's own LoRA settings, for the resume recipes (the same ``LoraConfig`` must be used)."""
    if not isinstance(run.last, AdapterCheckpoint):
        return None
    config = run.last.config
    keys = ("r", "lora_alpha", "target_modules", "use_rslora")
    return {key: config[key] for key in keys if config.get(key) is not None}


def _manifest(
    options: ExtrapolateOptions,
    choice: Choice,
    run: OpenedRun,
    records: StoreRecords,
    method: Method,
    output: OutputFormat,
    plan: OutputPlan,
    base_id: str | None,
    target: float,
) -> Manifest:
    store = run.store
    weights = output.weights(run.kind)
    config = records.config if method.needs_predictor else None
    return Manifest(
        nexttools_version=__version__,
        command=options.command,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        method=choice.method,
        alpha=choice.alpha,
        k=store.k,
        target_step=target,
        format=choice.format,
        weights=weights,
        dtype=str(plan.dtype).removeprefix("torch."),
        library_name="peft" if weights == "adapter" else "transformers",
        run_kind=store.run_kind,
        untied_embeddings=plan.untied,
        lora=_lora_facts(run),
        adapter_rank=plan.adapter_rank,
        resume_from=str(run.last_folder),
        base=BaseRecord(str(run.base_path), base_id, store.base_fingerprint),
        checkpoints=tuple(
            CheckpointRecord(int(step), path, fp)
            for step, path, fp in zip(store.steps, store.checkpoint_paths, store.fingerprints, strict=True)
        ),
        store={"path": str(store.path), "fingerprint": store.fingerprint()},
        predictor=config.manifest_entry() if config else None,
        backtest=records.backtest,
        verdict=records.verdict,
    )


def _base_shifts(run: OpenedRun, jump: Jump) -> dict[str, LowRankFactors]:
    """α·T̂ of every module, which ``--format base`` folded into the base (the shift to record)."""
    shifts = {}
    for name in run.modules:
        change = jump.change(name)
        assert isinstance(change, LowRankFactors), "a LoRA run's jump is low rank"
        shifts[name] = change
    return shifts


def _record(
    workdir: Path, run: OpenedRun, choice: Choice, target: float, shifts: dict[str, LowRankFactors]
) -> None:
    """Record the jump from the last checkpoint (and its base shift) for the resumed run's store."""
    step = int(run.steps[-1])
    if shifts:
        save_shift(workdir, step, shifts)
    entry = JumpEntry(
        step=step,
        method=choice.method,
        alpha=choice.alpha,
        target_step=target,
        claimed_steps=target - step,
        kept=True,
        base_shift=bool(shifts),
        in_checkpoint=False,
    )
    record_jump(workdir, entry)
    console.print(
        f"recorded the jump at step {step} in {Workdir(workdir).jumps}: resume the run from this output"
    )


def extrapolate(options: ExtrapolateOptions) -> ExtrapolateSummary:
    """Write the extrapolated model of ``options`` (nothing with ``dry_run``); see the module docstring.

    Under torchrun every rank plans the same output, each writes its share of the shards, and rank 0
    alone stages the folder, writes the rest and commits it (:mod:`nexttools.ranks`).
    """
    with joined(resolve_device(options.device)) as ranks, together(ranks):
        return _extrapolate(options, ranks)


def _extrapolate(options: ExtrapolateOptions, ranks: Ranks) -> ExtrapolateSummary:
    workdir = Workdir(options.workdir, options.store)
    store_path = workdir.existing_store()
    out_dtype = DTYPES[options.dtype] if options.dtype else None
    device = ranks.device
    with open_store(store_path) as store:
        run = OpenedRun(store)
        records = StoreRecords(Path(options.workdir), store)
        verdict = records.verdict
        choice = choose(
            options.method,
            options.alpha,
            options.format,
            run,
            verdict,
            records.backtest,
            out_dtype,
        )
        method, output = get_method(choice.method), get_output(choice.format)
        warnings = [*choice.notes, *_alpha_warning(choice.alpha)]
        out = Path(options.out or workdir.output(choice.alpha, method.name, output.suffix))
        _check_run_kind(store.run_kind, method, output)
        check_destination(out, overwrite=options.overwrite)
        output.check(run, method, out_dtype)
        if options.record and not output.resumes_in_place:
            raise UserError(
                f"--record is for an output the run resumes from in place (base, checkpoint); "
                f"--format {output.name} starts another run"
            )
        warnings += warn_if_judged(verdict, method.name, choice.alpha)
        predictor = records.predictor() if method.needs_predictor else None
        jump = method.jump(JumpRequest(run=run, alpha=choice.alpha, predictor=predictor))
        warnings += check_jump_size(run, method.name, jump, force=options.force)
        base_id, id_warnings = _base_id(options, run)
        warnings += id_warnings
        plan = output.plan(OutputRequest(run, jump, out_dtype, options.max_shard_size, base_id, device))
        warnings += plan.warnings
        if plan.untied:
            message = (
                "the run trained one side of the tied embeddings: writing both, tie_word_embeddings=false"
            )
            warn(message)
            warnings.append(message)
        summary = ExtrapolateSummary(
            out=out,
            method=method.name,
            format=output.name,
            alpha=choice.alpha,
            k=store.k,
            target_step=jump.target_step,
            dtype=str(plan.dtype).removeprefix("torch."),
            files=plan.files,
            shards=plan.shards,
            untied_embeddings=plan.untied,
            dry_run=options.dry_run,
            warnings=warnings,
        )
        if options.dry_run:
            return summary
        with contextlib.ExitStack() as held:
            with together(ranks):  # rank 0 stages (the lock, the free-space check); the others wait
                staged = ""
                if ranks.writer:
                    folder = staged_folder(out, overwrite=options.overwrite, needed_bytes=summary.total_bytes)
                    staged = str(held.enter_context(folder))
            staging = Path(ranks.shared_text(staged))
            with together(ranks):
                plan.write(staging, ranks)
                if not ranks.writer:
                    return summary
                manifest = _manifest(
                    options, choice, run, records, method, output, plan, base_id, jump.target_step
                )
                write_model_card(staging, manifest)
                write_manifest(staging, manifest)
                files = {
                    p.relative_to(staging).as_posix(): p.stat().st_size
                    for p in sorted(staging.rglob("*"))
                    if p.is_file()
                }
                shifts = _base_shifts(run, jump) if options.record and output.name == "base" else {}
        if options.record:  # once the output is in place: a failed write records nothing
            _record(Path(options.workdir), run, choice, jump.target_step, shifts)
    console.print(f"wrote {out} ({len(files)} files, {human_bytes(sum(files.values()))})")
    return replace(summary, files=files)
