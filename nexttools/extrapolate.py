"""``extrapolate``: predict-extend the last checkpoint, Ŵ = W_c + α·T̂, and write a drop-in model.

T̂ is the predicted change over the next k checkpoints of every trained module (DESIGN.md):

- ``next``: the NExt predictor's σ̂ û v̂ᵀ (û, v̂ renormalised to unit length);
- ``linear-rank1``: the AlphaRL-style least-squares extrapolation of the rank-1 triples
  (:func:`nexttools.baselines.linear_rank1`);
- ``linear-full``: the RL-Extra-style T̂ = ΔW_c − ΔW_{c−k}, exact and of full rank: from the two
  checkpoints' LoRA factors (rank ≤ 2r, never a dense subtraction of factors) or dense weights.

W_c is the *whole* merged last checkpoint (base + its full LoRA delta, not a rank-1 truncation).
Every tensor that is not a trained module is copied bit-for-bit from where it lives: the base for
a LoRA run, the last checkpoint for a full-weight run and for ``modules_to_save``. Each tensor is
computed in float32 and rounded once to the output dtype (the source tensor's, or ``--dtype``).

Order of work, so that a mistake costs nothing and no half-written output looks whole: check the
options, the store, the base's and the checkpoints' fingerprints and the prediction (finite values)
first; plan every output file and its size (all shapes are known from the headers); then stream
tensor by tensor into a hidden staging folder (:func:`nexttools.writer.staged_folder`), write the
config, tokenizer, model card and, last, the manifest, and rename the folder into place.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from nexttools import __version__
from nexttools.adapter_output import build_adapter, save_adapter
from nexttools.baselines import linear_rank1
from nexttools.card import write_model_card
from nexttools.checkpoints.adapter import AdapterCheckpoint, open_adapter
from nexttools.checkpoints.base import resolve_base
from nexttools.checkpoints.discover import CheckpointRef
from nexttools.checkpoints.fingerprint import fingerprint
from nexttools.checkpoints.weights import ModelWeights
from nexttools.console import console, progress, warn
from nexttools.device import resolve_device
from nexttools.errors import UserError
from nexttools.fit import CONFIG_FILE, STORE_FILE, load_predictor
from nexttools.lowrank import LowRankFactors
from nexttools.manifest import write_manifest
from nexttools.store import DeltaArrays, TrajectoryStore, open_store
from nexttools.writer import ShardedWriter, TensorSpec, check_destination, staged_folder

Method = Literal["next", "linear-rank1", "linear-full"]
OutputFormat = Literal["merged", "adapter"]
METHODS: tuple[str, ...] = ("next", "linear-rank1", "linear-full")
FORMATS: tuple[str, ...] = ("merged", "adapter")
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
ALPHA_WARNING = 4.0  # the paper reports instability beyond this
# Tokenizer and chat-template files (mergekit's list, plus vocab.json and the VLM processor configs).
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
GENERATION_CONFIG = "generation_config.json"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class ExtrapolateOptions:
    """Inputs of :func:`extrapolate`; the CLI maps its options one to one onto these fields.

    ``store`` defaults to ``<workdir>/trajectory.h5``; ``out`` to
    ``<workdir>/extrapolated-alpha{α}[-{method}][-adapter]``; ``dtype`` (``bfloat16``, ``float16``,
    ``float32``) to each source tensor's own dtype; ``max_shard_size`` is in bytes.
    """

    workdir: Path = Path("nexttools-run")
    store: Path | None = None
    alpha: float = 1.5
    method: Method = "next"
    format: OutputFormat = "merged"
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
    """``<workdir>/extrapolated-alpha{α}``, then ``-{method}`` unless ``next``, ``-adapter`` for adapters."""
    name = f"extrapolated-alpha{alpha:g}"
    if method != "next":
        name += f"-{method}"
    if output_format == "adapter":
        name += "-adapter"
    return Path(workdir) / name


def _check_options(options: ExtrapolateOptions) -> list[str]:
    """Refuse impossible options; return the warnings worth repeating in the summary."""
    if options.method not in METHODS:
        raise UserError(f"unknown --method {options.method!r} (choose from {', '.join(METHODS)})")
    if options.format not in FORMATS:
        raise UserError(f"unknown --format {options.format!r} (choose from {', '.join(FORMATS)})")
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


# ---------------------------------------------------------------------------------------------
# Inputs: the store, the base and the checkpoints, checked against the fingerprints of extraction.


@dataclass
class _Run:
    """The extracted run: ``last`` (and ``older``, the checkpoint k before it, for ``linear-full``)."""

    store: TrajectoryStore
    kind: str
    base_path: Path
    base: ModelWeights
    last: AdapterCheckpoint | ModelWeights
    older: AdapterCheckpoint | ModelWeights | None = None  # None: ΔW_{c−k} is the base's zero delta


def _open_checkpoint(
    store: TrajectoryStore, row: int, base: ModelWeights
) -> AdapterCheckpoint | ModelWeights:
    """Checkpoint ``row`` of the store, refused if missing or changed since extraction."""
    step, path = int(store.steps[row]), Path(store.checkpoint_paths[row])
    if not path.is_dir():
        raise UserError(f"checkpoint {path} (step {step}) is missing; it was extracted into {store.path}")
    checkpoint: AdapterCheckpoint | ModelWeights
    if store.run_kind == "full":
        checkpoint = ModelWeights(path)
    else:
        checkpoint = open_adapter(CheckpointRef(step=step, path=path, kind="lora", layout="adapter"))
    # The same file list ``extract`` fingerprinted, since both come from the opened checkpoint.
    if fingerprint(checkpoint.files) != store.fingerprints[row]:
        raise UserError(
            f"checkpoint {path} (step {step}) changed since extraction: run `nexttools extract` again"
        )
    if isinstance(checkpoint, AdapterCheckpoint):
        checkpoint.check_base(base)  # settles each module's orientation (Conv1D) as extract did
    return checkpoint


def _open_run(store: TrajectoryStore, method: str) -> _Run:
    base_path = resolve_base(store.base_model)
    base = ModelWeights(base_path)
    if fingerprint(base.files) != store.base_fingerprint:
        raise UserError(f"the base model {base_path} changed since extraction: run `nexttools extract` again")
    run = _Run(store, store.run_kind, base_path, base, _open_checkpoint(store, len(store.steps) - 1, base))
    if method == "linear-full":
        older_row = len(store.steps) - 1 - store.k
        if older_row < -1:
            raise UserError(
                f"--method linear-full needs {store.k} checkpoints before the last (the base counts as one); "
                f"the store has {len(store.steps) - 1}"
            )
        run.older = _open_checkpoint(store, older_row, base) if older_row >= 0 else None
    return run


# ---------------------------------------------------------------------------------------------
# The added delta α·T̂ of every trained module, as factors (LoRA runs, rank-1 methods) or dense.


def _rank1_additions(store: TrajectoryStore, arrays: DeltaArrays, alpha: float) -> dict[str, LowRankFactors]:
    """α σ̂ û v̂ᵀ per module as (rows, 1) x (cols, 1) factors, û and v̂ renormalised; zero → rank 0."""
    additions: dict[str, LowRankFactors] = {}
    for j, name in enumerate(store.modules):
        rows, cols = (int(n) for n in store.shapes[j])
        u = arrays.u[store.u_offset[j] : store.u_offset[j + 1]].astype(np.float64)
        v = arrays.v[store.v_offset[j] : store.v_offset[j + 1]].astype(np.float64)
        sigma = float(arrays.sigma[j])
        if not (math.isfinite(sigma) and np.isfinite(u).all() and np.isfinite(v).all()):
            raise UserError(f"the prediction for {name} is not finite; nothing was written")
        u_norm, v_norm = float(np.linalg.norm(u)), float(np.linalg.norm(v))
        if sigma == 0.0 or u_norm == 0.0 or v_norm == 0.0 or alpha == 0.0:
            additions[name] = LowRankFactors(torch.zeros(rows, 0), torch.zeros(cols, 0))
            continue
        left = torch.from_numpy(alpha * sigma * u / u_norm).float()[:, None]
        right = torch.from_numpy(v / v_norm).float()[:, None]
        additions[name] = LowRankFactors(left, right)
    return additions


def _lora_difference_additions(
    names: list[str], newer: AdapterCheckpoint, older: AdapterCheckpoint | None, alpha: float
) -> dict[str, LowRankFactors]:
    """α (ΔW_c − ΔW_{c−k}) per module, exactly, as factors of rank ≤ 2r (never subtracting factors)."""
    additions: dict[str, LowRankFactors] = {}
    for name in names:
        f_new = newer.factors(name)
        lefts, rights = [alpha * f_new.left], [f_new.right]
        if older is not None:
            f_old = older.factors(name)
            lefts.append(-alpha * f_old.left)
            rights.append(f_old.right)
        additions[name] = LowRankFactors(torch.cat(lefts, dim=1), torch.cat(rights, dim=1))
    return additions


def _predicted(options: ExtrapolateOptions, run: _Run) -> tuple[DeltaArrays | None, dict[str, Any] | None]:
    """The rank-1 prediction of T̂ at the last row (None for ``linear-full``) and the predictor's info."""
    if options.method == "next":
        predictor = load_predictor(options.workdir, run.store)
        return predictor.predict(run.store, row=-1), predictor.info
    if options.method == "linear-rank1":
        return linear_rank1(run.store, row=-1), None
    return None, None


def _additions(
    options: ExtrapolateOptions, run: _Run
) -> tuple[dict[str, LowRankFactors] | None, dict | None]:
    """α·T̂ of every module as factors (None: dense ``linear-full`` of a full-weight run), and the
    predictor's info for the manifest."""
    arrays, info = _predicted(options, run)
    if arrays is not None:
        return _rank1_additions(run.store, arrays, options.alpha), info
    if isinstance(run.last, AdapterCheckpoint):
        older = run.older if isinstance(run.older, AdapterCheckpoint) else None
        return _lora_difference_additions(list(run.store.modules), run.last, older, options.alpha), info
    return None, info


def _backtest(workdir: Path, store: TrajectoryStore) -> dict[str, Any] | None:
    """The back-test ``fit`` recorded for this store (None when there is none, or it is another store's)."""
    path = Path(workdir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("store_fingerprint") != store.fingerprint():
        return None
    return config.get("backtest")


# ---------------------------------------------------------------------------------------------
# The merged model: which tensors, from where, in which dtype.


def _tied_embeddings(weights: ModelWeights) -> tuple[str, str] | None:
    """(output, input) embedding names when ``weights`` ties them, i.e. stores no ``lm_head.weight``."""
    if weights.config.get("tie_word_embeddings") is False or "lm_head.weight" in weights.names:
        return None
    inputs = [
        n
        for n in weights.names
        if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))
    ]
    return ("lm_head.weight", inputs[0]) if len(inputs) == 1 else None


@dataclass
class _MergedPlan:
    """Every output tensor with its source: ``template`` holds the tensors copied bit-for-bit."""

    template: ModelWeights
    specs: list[TensorSpec]
    source_name: dict[str, str]  # output name -> name in ``template`` (differs only for an untied lm_head)
    modules: set[str]
    carried: set[str]
    untied: bool
    config: dict[str, Any]
    dtype: torch.dtype


def _plan_merged(run: _Run, out_dtype: torch.dtype | None) -> _MergedPlan:
    template = run.base if run.kind == "lora" else run.last
    assert isinstance(template, ModelWeights)
    modules = set(run.store.modules)
    carried = set(run.last.carried) if isinstance(run.last, AdapterCheckpoint) else set()
    names = list(template.names)
    source_name = {name: name for name in names}
    untied = False
    tie = _tied_embeddings(template) if run.kind == "lora" else None  # a full run keeps its own layout
    if tie is not None and (modules | carried) & set(tie):
        untied = True
        if tie[0] not in source_name:
            names.append(tie[0])
        source_name[tie[0]] = tie[1]
    missing = sorted((modules | carried) - set(source_name))
    if missing:
        raise UserError(f"{missing[0]} is trained by the run but is not a tensor of {template.folder}")

    def dtype_of(name: str) -> torch.dtype:
        stored = template.dtype(source_name[name])
        return out_dtype if out_dtype is not None and stored.is_floating_point else stored

    specs = [TensorSpec(name, tuple(template.shape(source_name[name])), dtype_of(name)) for name in names]
    model_dtype = dtype_of(run.store.modules[0])
    config = dict(template.config)
    config["dtype"] = str(model_dtype).removeprefix("torch.")
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]
    if untied:
        config["tie_word_embeddings"] = False
    return _MergedPlan(template, specs, source_name, modules, carried, untied, config, model_dtype)


def _config_text(config: dict[str, Any]) -> str:
    """config.json as transformers writes it (indent 2, sorted keys, trailing newline)."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _compute(
    plan: _MergedPlan,
    run: _Run,
    name: str,
    additions: Mapping[str, LowRankFactors] | None,
    alpha: float,
    device: torch.device,
) -> torch.Tensor:
    """Ŵ of module ``name`` = W_c + α·T̂, float32 (rows, cols) on ``device``.

    LoRA runs: W_c = W_0 (or the saved weight that replaces it) + its whole LoRA delta, and α·T̂ is
    low rank, so Ŵ is two ``addmm`` on W_0: no out×in temporaries besides the float32 upcast and
    the result. Full-weight runs: W_c is read; α·T̂ is rank-1 factors
    or, for ``linear-full``, α (W_c − W_{c−k}) from the files.
    """
    last = run.last
    if isinstance(last, AdapterCheckpoint):
        stored = (
            last.carried_tensor(name) if name in last.carried else plan.template.get(plan.source_name[name])
        )
        own = last.factors(name)
        weight = torch.addmm(stored.to(device, torch.float32), own.left.to(device), own.right.to(device).T)
        if additions is not None:
            added = additions[name]
            weight.addmm_(added.left.to(device), added.right.to(device).T)  # ours: in place
        return weight
    weight = last.get(name).to(device, torch.float32)
    if additions is not None:
        added = additions[name]
        return torch.addmm(weight, added.left.to(device), added.right.to(device).T)
    previous = (run.older or run.base).get(name).to(device, torch.float32)
    return weight + alpha * (weight - previous)


def _write_merged(
    folder: Path,
    plan: _MergedPlan,
    run: _Run,
    additions: Mapping[str, LowRankFactors] | None,
    options: ExtrapolateOptions,
    device: torch.device,
) -> None:
    """Stream every output tensor, in plan order, into the shards of ``folder``."""
    specs = {spec.name: spec for spec in plan.specs}
    with ShardedWriter(folder, options.max_shard_size, plan.specs) as writer, progress() as bar:
        task = bar.add_task("writing tensors", total=len(writer.names))
        for name in writer.names:
            dtype = specs[name].dtype
            if name in plan.modules:
                exact = _compute(plan, run, name, additions, options.alpha, device)
                # NaN fails the comparisons; anything beyond the dtype's range rounds to ±inf.
                # (aminmax is one pass with no temporary: ~10x cheaper than an inf-norm.)
                low, high = (float(x) for x in torch.aminmax(exact))
                if not -torch.finfo(dtype).max <= low <= high <= torch.finfo(dtype).max:
                    raise UserError(
                        f"the extrapolated {name} has non-finite values in {dtype} "
                        "(try a smaller --alpha or --dtype float32); nothing was written"
                    )
                tensor = exact.to(dtype)
            elif name in plan.carried:
                assert isinstance(run.last, AdapterCheckpoint)
                tensor = run.last.carried_tensor(name).to(dtype)
            else:
                tensor = plan.template.get(plan.source_name[name]).to(dtype)
            writer.add(name, tensor)
            bar.advance(task)
        writer.finish()


# ---------------------------------------------------------------------------------------------
# Files copied beside the weights, and the manifest.


def _side_files(run: _Run, output_format: str) -> dict[str, Path]:
    """Output name -> source of the tokenizer, chat template and generation config (last checkpoint first)."""
    last_folder = run.last.ref.path if isinstance(run.last, AdapterCheckpoint) else run.last.folder
    tokenizer_home = (
        last_folder if any((last_folder / n).is_file() for n in TOKENIZER_FILES) else run.base_path
    )
    files = {name: tokenizer_home / name for name in TOKENIZER_FILES if (tokenizer_home / name).is_file()}
    if output_format == "merged":
        for folder in (last_folder, run.base_path):
            if (folder / GENERATION_CONFIG).is_file():
                files[GENERATION_CONFIG] = folder / GENERATION_CONFIG
                break
        config_home = run.base_path if run.kind == "lora" else last_folder
        if config_home.joinpath("config.json").is_file() and json.loads(
            config_home.joinpath("config.json").read_text()
        ).get("auto_map"):
            files |= {p.name: p for p in sorted(config_home.glob("*.py"))}  # remote code named by auto_map
    return files


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


def _base_id(options: ExtrapolateOptions, run: _Run) -> tuple[str | None, list[str]]:
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


def _manifest(
    options: ExtrapolateOptions,
    run: _Run,
    base_id: str | None,
    dtype: torch.dtype,
    info: dict | None,
    untied: bool,
) -> dict[str, Any]:
    store = run.store
    return {
        "nexttools_version": __version__,
        "command": _command(options),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": options.method,
        "alpha": options.alpha,
        "k": store.k,
        "format": options.format,
        "dtype": str(dtype).removeprefix("torch."),
        "library_name": "peft" if options.format == "adapter" else "transformers",
        "run_kind": store.run_kind,
        "untied_embeddings": untied,
        "base": {"path": str(run.base_path), "id": base_id, "fingerprint": store.base_fingerprint},
        "checkpoints": [
            {"step": int(step), "path": path, "fingerprint": fp}
            for step, path, fp in zip(store.steps, store.checkpoint_paths, store.fingerprints, strict=True)
        ],
        "store": {"path": str(store.path), "fingerprint": store.fingerprint()},
        "predictor": info,
        "backtest": _backtest(options.workdir, store),
    }


# ---------------------------------------------------------------------------------------------


def extrapolate(options: ExtrapolateOptions) -> ExtrapolateSummary:
    """Write the extrapolated model of ``options`` (nothing with ``dry_run``); see the module docstring."""
    warnings = _check_options(options)
    store_path = Path(options.store or Path(options.workdir) / STORE_FILE)
    if not store_path.is_file():
        raise UserError(f"no trajectory store at {store_path}: run `nexttools extract` first")
    out = Path(options.out or default_out(options.workdir, options.alpha, options.method, options.format))
    out_dtype = DTYPES[options.dtype] if options.dtype else None
    device = resolve_device(options.device)
    with open_store(store_path) as store:
        if options.format == "adapter" and store.run_kind != "lora":
            raise UserError("--format adapter needs a LoRA run; this store holds a full-weight run")
        check_destination(out, overwrite=options.overwrite)
        run = _open_run(store, options.method)
        additions, info = _additions(options, run)
        base_id, id_warnings = _base_id(options, run)
        warnings += id_warnings
        side = _side_files(run, options.format)
        sizes = {name: path.stat().st_size for name, path in side.items()}

        if options.format == "adapter":
            assert isinstance(run.last, AdapterCheckpoint) and additions is not None
            tensors, adapter_config = build_adapter(run.last, additions, dtype=out_dtype, base_id=base_id)
            dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
            sizes |= {
                "adapter_model.safetensors": sum(t.numel() * t.element_size() for t in tensors.values())
            }
            shards, untied = 1, False
        else:
            plan = _plan_merged(run, out_dtype)
            with ShardedWriter(out, options.max_shard_size, plan.specs) as planner:  # writes nothing
                sizes |= planner.file_sizes()
                shards = len(planner.shards)
            sizes["config.json"] = len(_config_text(plan.config).encode())
            dtype, untied = plan.dtype, plan.untied
            if untied:
                message = (
                    "the run trained one side of the tied embeddings: writing both, tie_word_embeddings=false"
                )
                warn(message)
                warnings.append(message)

        summary = ExtrapolateSummary(
            out=out,
            method=options.method,
            format=options.format,
            alpha=options.alpha,
            k=store.k,
            dtype=str(dtype).removeprefix("torch."),
            files=sizes,
            shards=shards,
            untied_embeddings=untied,
            dry_run=options.dry_run,
            warnings=warnings,
        )
        if options.dry_run:
            return summary

        with staged_folder(out, overwrite=options.overwrite, needed_bytes=summary.total_bytes) as staging:
            if options.format == "adapter":
                save_adapter(staging, tensors, adapter_config)
            else:
                _write_merged(staging, plan, run, additions, options, device)
                (staging / "config.json").write_text(_config_text(plan.config))
            for name, source in side.items():
                shutil.copyfile(source, staging / name)
            manifest = _manifest(options, run, base_id, dtype, info, untied)
            write_model_card(staging, manifest)
            write_manifest(staging, manifest)
            files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
    console.print(f"wrote {out} ({len(files)} files, {sum(files.values()) / 1e6:.1f} MB)")
    return replace(summary, files=files)
