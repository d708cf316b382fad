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

import math
import re
import shlex
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nexttools import __version__
from nexttools.card import write_model_card
from nexttools.checkpoints.adapter import AdapterCheckpoint
from nexttools.console import console, warn
from nexttools.device import resolve_device
from nexttools.errors import UserError
from nexttools.manifest import write_manifest
from nexttools.methods import JumpRequest, Method, get_method
from nexttools.outputs import OutputFormat, OutputPlan, OutputRequest, get_output
from nexttools.run import OpenedRun
from nexttools.saved_predictor import load_predictor, recorded_backtest
from nexttools.store import STORE_FILE, open_store
from nexttools.verdict import read_verdict, warn_if_judged
from nexttools.writer import check_destination, staged_folder

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
ALPHA_WARNING = 4.0  # the paper reports instability beyond this
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class ExtrapolateOptions:
    """Inputs of :func:`extrapolate`; the CLI maps its options one to one onto these fields.

    ``method`` and ``format`` name entries of the method and output registries. ``store``
    defaults to ``<workdir>/trajectory.h5``; ``out`` to :func:`default_out`; ``dtype``
    (``bfloat16``, ``float16``, ``float32``) to each source tensor's own dtype; ``max_shard_size``
    is in bytes.
    """

    workdir: Path = Path("nexttools-run")
    store: Path | None = None
    alpha: float = 1.5
    method: str = "next"
    format: str = "merged"
    out: Path | None = None
    dtype: str | None = None
    max_shard_size: int = 5 * 10**9
    overwrite: bool = False
    dry_run: bool = False
    base_model_id: str | None = None
    device: str = "auto"


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


def parse_size(text: str) -> int:
    """Bytes in ``"5GB"`` (10⁹), ``"2GiB"`` (2³⁰), ``"500MB"``, ``"1024"``...; ``UserError`` otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise UserError(f"cannot read the size {text!r} (examples: 5GB, 500MB, 2GiB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise UserError(f"the size {text!r} must be positive")
    return size


def default_out(workdir: Path, alpha: float, method: str, output_format: str) -> Path:
    """``<workdir>/extrapolated-alpha{α}``, then ``-{method}`` unless ``next``, then the format's suffix
    (none for ``merged``; ``-adapter``, ``-base``, ``-checkpoint``)."""
    name = f"extrapolated-alpha{alpha:g}"
    if method != "next":
        name += f"-{method}"
    return Path(workdir) / (name + get_output(output_format).suffix)


def _check_options(options: ExtrapolateOptions) -> list[str]:
    """Refuse impossible options; return the warnings worth repeating in the summary."""
    get_method(options.method)
    get_output(options.format)
    if options.dtype is not None and options.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {options.dtype!r} (choose from {', '.join(DTYPES)})")
    if not math.isfinite(options.alpha) or options.alpha < 0:
        raise UserError(f"--alpha must be a finite number ≥ 0, got {options.alpha}")
    if options.max_shard_size <= 0:
        raise UserError(f"--max-shard-size must be positive, got {options.max_shard_size} bytes")
    if options.alpha > ALPHA_WARNING:
        message = (
            f"α = {options.alpha:g} > {ALPHA_WARNING:g}: the NExt paper reports unstable models this far out"
        )
        warn(message)
        return [message]
    return []


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


def _command(options: ExtrapolateOptions) -> str:
    """The command line that reproduces this output (options that differ from their defaults)."""
    defaults = ExtrapolateOptions()
    parts = ["nexttools", "extrapolate"]
    for flag, attr in (
        ("--workdir", "workdir"),
        ("--store", "store"),
        ("--alpha", "alpha"),
        ("--method", "method"),
        ("--format", "format"),
        ("--out", "out"),
        ("--dtype", "dtype"),
        ("--max-shard-size", "max_shard_size"),
        ("--base-model-id", "base_model_id"),
    ):
        value = getattr(options, attr)
        if value != getattr(defaults, attr) or attr == "alpha":
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if options.overwrite:
        parts.append("--overwrite")
    return shlex.join(parts)


def _lora_facts(run: OpenedRun) -> dict[str, Any] | None:
    """The run's own LoRA settings, for the resume recipes (the same ``LoraConfig`` must be used)."""
    if not isinstance(run.last, AdapterCheckpoint):
        return None
    config = run.last.config
    keys = ("r", "lora_alpha", "target_modules", "use_rslora")
    return {key: config[key] for key in keys if config.get(key) is not None}


def _manifest(
    options: ExtrapolateOptions,
    run: OpenedRun,
    output: OutputFormat,
    plan: OutputPlan,
    base_id: str | None,
    target: float,
    predictor: dict[str, Any] | None,
) -> dict[str, Any]:
    store = run.store
    weights = output.weights(run.kind)
    return {
        "nexttools_version": __version__,
        "command": _command(options),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": options.method,
        "alpha": options.alpha,
        "k": store.k,
        "target_step": target,
        "format": options.format,
        "weights": weights,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "library_name": "peft" if weights == "adapter" else "transformers",
        "run_kind": store.run_kind,
        "untied_embeddings": plan.untied,
        "lora": _lora_facts(run),
        "resume_from": str(run.last_folder),
        "base": {"path": str(run.base_path), "id": base_id, "fingerprint": store.base_fingerprint},
        "checkpoints": [
            {"step": int(step), "path": path, "fingerprint": fp}
            for step, path, fp in zip(store.steps, store.checkpoint_paths, store.fingerprints, strict=True)
        ],
        "store": {"path": str(store.path), "fingerprint": store.fingerprint()},
        "predictor": predictor,
        "backtest": recorded_backtest(options.workdir, store),
        "verdict": read_verdict(options.workdir, store),
        **plan.manifest,
    }


def extrapolate(options: ExtrapolateOptions) -> ExtrapolateSummary:
    """Write the extrapolated model of ``options`` (nothing with ``dry_run``); see the module docstring."""
    warnings = _check_options(options)
    method, output = get_method(options.method), get_output(options.format)
    store_path = Path(options.store or Path(options.workdir) / STORE_FILE)
    if not store_path.is_file():
        raise UserError(f"no trajectory store at {store_path}: run `nexttools extract` first")
    out = Path(options.out or default_out(options.workdir, options.alpha, options.method, options.format))
    out_dtype = DTYPES[options.dtype] if options.dtype else None
    device = resolve_device(options.device)
    with open_store(store_path) as store:
        _check_run_kind(store.run_kind, method, output)
        check_destination(out, overwrite=options.overwrite)
        run = OpenedRun(store)
        output.check(run, method, out_dtype)
        warnings += warn_if_judged(read_verdict(options.workdir, store), method.name, options.alpha)
        predictor = load_predictor(Path(options.workdir), store) if method.needs_predictor else None
        jump = method.jump(JumpRequest(run=run, alpha=options.alpha, predictor=predictor))
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
            alpha=options.alpha,
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
        with staged_folder(out, overwrite=options.overwrite, needed_bytes=summary.total_bytes) as staging:
            plan.write(staging)
            manifest = _manifest(options, run, output, plan, base_id, jump.target_step, jump.predictor)
            write_model_card(staging, manifest)
            write_manifest(staging, manifest)
            files = {
                p.relative_to(staging).as_posix(): p.stat().st_size
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
    console.print(f"wrote {out} ({len(files)} files, {sum(files.values()) / 1e6:.1f} MB)")
    return replace(summary, files=files)
