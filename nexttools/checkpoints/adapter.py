"""PEFT LoRA adapters, read with PEFT's exact semantics but without PEFT or the base model.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
``torch.save``'d ``adapter_model.bin``). For every LoRA module PEFT's merged weight is
``W0 + s·B·A`` (``nn.Linear``) or ``W0 + s·(B·A)ᵀ`` (GPT-2 ``Conv1D`` with ``fan_in_fan_out``, and
embeddings), with the scaling ``s = alpha/r`` (``alpha/√r`` under rsLoRA) resolved per module
through ``rank_pattern``/``alpha_pattern``. This module maps adapter keys to base weight names,
resolves ``s``, decides the orientation and hands out the factors, scaling folded in, so that the
rank-1 engine never needs PEFT, the base, or an out×in matrix. Anything whose merge is not that
additive formula relative to the original base (DoRA, LoRA biases, PiSSA-style inits, MoE
``target_parameters``, LoRA variants, ...) is refused with one line naming the file and field.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from nexttools.checkpoints.adapter_config import (
    CONFIG_FILE,
    pattern_value,
    read_config,
    refuse_unsupported,
)
from nexttools.checkpoints.discover import CheckpointRef
from nexttools.checkpoints.factors import LowRankFactors
from nexttools.checkpoints.keys import normalise_key
from nexttools.checkpoints.sharded import open_sharded
from nexttools.checkpoints.weights import ModelWeights, SafetensorsHeader, read_safetensors_header
from nexttools.console import warn
from nexttools.errors import UserError


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module, as it applies to one base weight.

    ``name`` is the base weight's name, ``shape`` its ``(rows, cols)`` on disk. With A ``(r, a)`` and
    B ``(b, r)`` from the file: ΔW = scaling · B A (``(b, a)``), or its transpose when ``transposed``
    (``fan_in_fan_out`` Conv1D and embeddings, ``(a, b)``). ``key_a``/``key_b`` are the file's keys.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    alpha: float
    scaling: float
    transposed: bool
    key_a: str
    key_b: str

    @property
    def is_embedding(self) -> bool:
        """Embedding LoRA (``lora_embedding_A/B``): always transposed, never re-oriented by shape."""
        return self.key_a.endswith("lora_embedding_A")


class TensorSource(Protocol):
    """An adapter's tensors: shapes up front (by file key), values one at a time."""

    shapes: dict[str, tuple[int, ...]]

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored (dtype included)."""
        ...


class _TensorFile:
    """A PEFT weight file's tensors: names, shapes and dtypes up front, values one at a time."""

    def __init__(self, path: Path) -> None:
        self._header: SafetensorsHeader | None = None
        self._tensors: dict[str, torch.Tensor] | None = None
        if path.suffix == ".safetensors":
            self._header = read_safetensors_header(path)
            self.shapes = {key: info.shape for key, info in self._header.tensors.items()}
        else:
            self._tensors = _load_bin(path)
            self.shapes = {key: tuple(value.shape) for key, value in self._tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored; from safetensors in a new buffer (see :mod:`.weights` for why)."""
        if self._tensors is not None:
            return self._tensors[key]
        assert self._header is not None  # one of the two is set in __init__
        return self._header.read(key)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` (never unpickle code); mmap'd when the file allows it."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be mmap'd
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable weights-only torch file ({type(error).__name__})") from error
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise UserError(f"{path}: not a state dict of named tensors")
    return state


class AdapterCheckpoint:
    """One PEFT LoRA adapter checkpoint (obtained from :func:`open_adapter`).

    Attributes:
        ref: the checkpoint.
        config: ``adapter_config.json`` as a dict.
        modules: base weight name -> :class:`LoraModule`, sorted by name.
        carried: base weight name -> adapter key, for the absolute tensors the adapter stores
            (``modules_to_save``, saved embedding layers, trained biases). A name can be both a LoRA
            module and carried (a LoRA'd embedding saved with ``save_embedding_layers``): the carried
            tensor then replaces the base weight and the LoRA delta applies on top of it.
        scaling_rule: ``"alpha/r"`` or ``"alpha/sqrt(r)"`` (rsLoRA).
        base_model_name_or_path: the base recorded by the trainer, or None.
        files: the files :func:`fingerprint` covers (the weight file and ``adapter_config.json``, or a
            sharded checkpoint's files), the config file last.
    """

    def __init__(
        self,
        ref: CheckpointRef,
        config: dict[str, Any],
        tensors: TensorSource,
        modules: dict[str, LoraModule],
        carried: dict[str, str],
        files: list[Path],
    ) -> None:
        self.ref = ref
        self.config = config
        self._tensors = tensors
        self.modules = dict(sorted(modules.items()))
        self.carried = dict(sorted(carried.items()))
        self.scaling_rule = "alpha/sqrt(r)" if config.get("use_rslora") else "alpha/r"
        base = config.get("base_model_name_or_path")
        self.base_model_name_or_path: str | None = base if isinstance(base, str) and base else None
        self.files = files

    @property
    def config_path(self) -> Path:
        """The file ``config`` was read from (``adapter_config.json``, or a sharded format's own)."""
        return self.files[-1]

    def factors(self, name: str) -> LowRankFactors:
        """ΔW of module ``name`` as float32 factors in the base weight's orientation (:func:`lora_delta`)."""
        return lora_delta(self.modules[name], *self.stored_factors(name))

    def stored_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A ``(r, a)``, B ``(b, r)``) of module ``name`` exactly as stored (dtype included)."""
        module = self.modules[name]
        return self._tensors.get(module.key_a), self._tensors.get(module.key_b)

    def carried_tensor(self, name: str) -> torch.Tensor:
        """The absolute tensor stored for base weight ``name``, as stored (dtype included)."""
        return self._tensors.get(self.carried[name])

    def check_base(self, base: ModelWeights) -> None:
        """Check every module against the base's shapes, settling the orientation; refuse mismatches.

        A Linear module whose configured orientation does not fit the base but whose transpose does
        is re-oriented (PEFT forces ``fan_in_fan_out`` per layer type, whatever the config says); a
        square weight keeps the configured orientation. Carried tensors must match the base where
        the base has that name (a resized vocabulary is not supported).
        """
        for name, module in self.modules.items():
            if name in self.carried:
                expected = self._tensors.shapes[self.carried[name]]
            elif name in base:
                expected = base.shape(name)
            else:
                tied = base.config.get("tie_word_embeddings") and name.endswith("lm_head.weight")
                why = "the base ties it to the input embedding" if tied else "wrong --base?"
                raise UserError(
                    f"{self.ref.path}: LoRA module {name.removesuffix('.weight')} has no weight {name} "
                    f"in the base {base.folder} ({why})"
                )
            if expected == module.shape:
                continue
            flipped = (module.shape[1], module.shape[0])
            if expected == flipped and not module.is_embedding:
                self.modules[name] = replace(module, shape=flipped, transposed=not module.transposed)
                continue
            raise UserError(
                f"{self.ref.path}: {name} has shape {tuple(expected)} in the base {base.folder}, "
                f"but the adapter's LoRA factors give {module.shape} (wrong --base?)"
            )
        for name, key in self.carried.items():
            if name in base and base.shape(name) != self._tensors.shapes[key]:
                raise UserError(
                    f"{self.ref.path}: saved tensor {key} has shape {self._tensors.shapes[key]} but {name} "
                    f"has {base.shape(name)} in the base {base.folder} (resized vocabulary or wrong --base?)"
                )


def lora_delta(module: LoraModule, lora_a: torch.Tensor, lora_b: torch.Tensor) -> LowRankFactors:
    """ΔW = s·B A of ``module`` (or its transpose) as float32 factors in the base weight's orientation.

    Linear: left = s·B ``(out, r)``, right = Aᵀ ``(in, r)``. Transposed (Conv1D, embedding):
    left = s·Aᵀ ``(rows, r)``, right = B ``(cols, r)``. bf16/fp16 factors are upcast first
    (exactly), and the scaling is applied once, in float32.
    """
    lora_a, lora_b = lora_a.to(torch.float32), lora_b.to(torch.float32)
    # Transposed views, not copies: every consumer multiplies them, and the extractor copies them to
    # float64 in the layout it needs anyway.
    if module.transposed:
        return LowRankFactors(left=lora_a.T * module.scaling, right=lora_b)
    return LowRankFactors(left=lora_b * module.scaling, right=lora_a.T)


def open_adapter(ref: CheckpointRef) -> AdapterCheckpoint:
    """Open the adapter of a LoRA checkpoint: read its config and tensor index, validate, map keys.

    Tensors are not read (except for ``.bin`` files, which cannot be read lazily). Raises
    ``UserError`` for a missing or unreadable config or weight file, an unsupported adapter feature,
    or an adapter with no LoRA tensors (a DeepSpeed ZeRO-3 placeholder).
    """
    if ref.kind != "lora":
        raise ValueError(f"open_adapter needs a LoRA checkpoint, got kind={ref.kind!r} for {ref.path}")
    sharded = open_sharded(ref.path)
    if sharded is not None:
        refuse_unsupported(sharded.config_path, sharded.config)
        modules, carried = _map_keys(sharded.files[0], sharded.shapes, sharded.config)
        return AdapterCheckpoint(ref, sharded.config, sharded, modules, carried, sharded.files)
    config_path = ref.path / CONFIG_FILE
    config = read_config(config_path)
    refuse_unsupported(config_path, config)
    weights_path = next(
        (
            ref.path / name
            for name in ("adapter_model.safetensors", "adapter_model.bin")
            if (ref.path / name).is_file()
        ),
        None,
    )
    if weights_path is None:
        raise UserError(f"{ref.path}: no adapter_model.safetensors or adapter_model.bin")
    tensors = _TensorFile(weights_path)
    modules, carried = _map_keys(weights_path, tensors.shapes, config)
    return AdapterCheckpoint(ref, config, tensors, modules, carried, [weights_path, config_path])


def _map_keys(
    path: Path, shapes: dict[str, tuple[int, ...]], config: dict[str, Any]
) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """Sort the file's keys into LoRA modules (keyed by base weight name) and carried absolute tensors."""
    pairs: dict[str, dict[str, str]] = {}  # module path -> {"A"/"B"/"embA"/"embB": key}
    carried: dict[str, str] = {}
    suffixes = {
        ".lora_A.weight": "A",
        ".lora_B.weight": "B",
        ".lora_embedding_A": "embA",
        ".lora_embedding_B": "embB",
    }
    for key in shapes:
        normal = normalise_key(key)
        role = next((suffixes[s] for s in suffixes if normal.endswith(s)), None)
        if role is not None:
            module_path = normal[: normal.rfind(".lora_")]
            pairs.setdefault(module_path, {})[role] = key
        elif normal.endswith(".lora_B.bias"):
            raise UserError(f"{path}: holds {key} (lora_bias), which is not supported")
        elif "lora_magnitude_vector" in normal:
            raise UserError(f"{path}: holds {key} (use_dora: DoRA magnitude), which is not supported")
        elif "trainable_tokens_delta" in normal:
            raise UserError(f"{path}: holds {key} (trainable_token_indices), which is not supported")
        elif any(part.startswith("lora_") for part in normal.split(".")):
            raise UserError(f"{path}: holds {key}, which is not a plain LoRA A/B tensor")
        else:
            name = ".".join(
                part for part in normal.split(".") if part not in ("modules_to_save", "base_layer")
            )
            if name in carried:
                raise UserError(f"{path}: {carried[name]} and {key} both map to {name}")
            carried[name] = key
    if not pairs:
        raise UserError(
            f"{path}: holds no LoRA tensors (lora_A/lora_B); a DeepSpeed ZeRO-3 placeholder? "
            "save with stage3_gather_16bit_weights_on_model_save=true"
        )

    modules: dict[str, LoraModule] = {}
    rank_disagreements: list[str] = []
    for module_path, roles in pairs.items():
        module = _lora_module(path, module_path, roles, shapes, config)
        configured_r = pattern_value(config.get("rank_pattern"), module_path, config.get("r", 8))
        if configured_r != module.rank:
            rank_disagreements.append(
                f"{module_path}: r={module.rank} in the file, {configured_r} in the config"
            )
        modules[module.name] = module
    if rank_disagreements:
        warn(
            f"{path}: {len(rank_disagreements)} module(s) have a LoRA rank that differs from "
            f"adapter_config.json (e.g. {rank_disagreements[0]}); using the ranks of the tensors"
        )
    return modules, carried


def _lora_module(
    path: Path,
    module_path: str,
    roles: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
    config: dict[str, Any],
) -> LoraModule:
    """Build one module from its A/B keys: rank from the shapes, alpha from the patterns, orientation."""
    embedding = "embA" in roles or "embB" in roles
    key_a, key_b = (roles.get("embA"), roles.get("embB")) if embedding else (roles.get("A"), roles.get("B"))
    if key_a is None or key_b is None or len(roles) != 2:
        raise UserError(f"{path}: {module_path} does not have exactly one LoRA A and one LoRA B tensor")
    shape_a, shape_b = shapes[key_a], shapes[key_b]
    if len(shape_a) != 2 or len(shape_b) != 2:
        raise UserError(
            f"{path}: {module_path} has {len(shape_a)}-D LoRA factors (convolution LoRA is not supported)"
        )
    rank = shape_a[0]
    if shape_b[1] != rank or rank == 0:
        raise UserError(
            f"{path}: {module_path} has LoRA factors of shapes {shape_a} and {shape_b}, which do not fit"
        )
    alpha = float(pattern_value(config.get("alpha_pattern"), module_path, config.get("lora_alpha", 8)))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    transposed = embedding or bool(config.get("fan_in_fan_out"))
    shape = (shape_a[1], shape_b[0]) if transposed else (shape_b[0], shape_a[1])
    return LoraModule(
        name=f"{module_path}.weight",
        shape=shape,
        rank=rank,
        alpha=alpha,
        scaling=scaling,
        transposed=transposed,
        key_a=key_a,
        key_b=key_b,
    )


def check_same_targets(adapters: Sequence[AdapterCheckpoint]) -> None:
    """Refuse a run whose checkpoints do not train the same modules with the same shapes.

    Ranks and scalings may differ between checkpoints (each checkpoint's factors carry their own),
    but the set of LoRA modules (``target_modules``), their shapes, and the carried tensors
    (``modules_to_save``) must be the same everywhere.
    """
    if not adapters:
        return
    first = adapters[0]
    for other in adapters[1:]:
        _compare(first, other, "target_modules", set(first.modules), set(other.modules))
        _compare(first, other, "modules_to_save", set(first.carried), set(other.carried))
        for name, module in other.modules.items():
            if module.shape != first.modules[name].shape:
                raise UserError(
                    f"{other.ref.path}: {name} has shape {module.shape}, but {first.modules[name].shape} in "
                    f"{first.ref.path}; all checkpoints must adapt the same base"
                )


def _compare(
    first: AdapterCheckpoint, other: AdapterCheckpoint, field: str, mine: set[str], theirs: set[str]
) -> None:
    if mine == theirs:
        return
    missing, extra = sorted(mine - theirs), sorted(theirs - mine)
    what = "; ".join(
        f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
        for label, names in (("lacks", missing), ("adds", extra))
        if names
    )
    raise UserError(
        f"{other.ref.path}: {field} differ from {first.ref.path} ({what}); a run must keep one adapter layout"
    )
