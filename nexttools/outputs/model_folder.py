"""A Hugging Face model folder whose trained modules carry a jump: planned from headers, then streamed.

Shared by the outputs that write whole models (``merged``, ``base`` and a full-weight ``checkpoint``).
Each says which folder is the **template** (every tensor it does not compute is copied from there
bit-for-bit) and how to compute a trained module in float32; this module plans the tensors, dtypes
and shards up front (all shapes are in the headers), and streams them tensor by tensor into
:class:`~nexttools.writer.ShardedWriter`, rounding each computed tensor once to its output dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nexttools.checkpoints.weights import ModelWeights
from nexttools.console import progress
from nexttools.errors import UserError
from nexttools.ranks import Ranks, together
from nexttools.run import Change
from nexttools.writer import ShardedWriter, TensorSpec

CONFIG_NAME = "config.json"
COPY_BLOCK_BYTES = 32 * 2**20
"""Tensors copied from the template stream through in blocks of this size (three in memory at most)."""
GENERATION_CONFIG = "generation_config.json"
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


def tied_embeddings(weights: ModelWeights) -> tuple[str, str] | None:
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
class ModelPlan:
    """Every output tensor with its source: ``template`` holds the tensors copied bit-for-bit.

    ``source_name`` maps an output name to its name in ``template`` (they differ only for an untied
    ``lm_head``); ``computed`` are the names :func:`write_model` asks the caller for.
    """

    template: ModelWeights
    specs: list[TensorSpec]
    source_name: dict[str, str]
    computed: set[str]
    untied: bool
    config: dict[str, Any]
    dtype: torch.dtype

    @property
    def config_text(self) -> str:
        """config.json as transformers writes it (indent 2, sorted keys, trailing newline)."""
        return json.dumps(self.config, indent=2, sort_keys=True) + "\n"


def plan_model(
    template: ModelWeights,
    computed: Collection[str],
    *,
    changed: Collection[str],
    untie: bool,
    out_dtype: torch.dtype | None,
) -> ModelPlan:
    """Plan a model folder on ``template`` in which the names ``computed`` are computed.

    ``changed`` are the names whose values will differ from the template's (trained modules, and
    tensors the adapter carries). When ``untie`` and the template ties its embeddings while one side
    of the tie is changed, both sides are written and ``tie_word_embeddings`` becomes false.
    ``out_dtype`` replaces every floating dtype (``--dtype``); None keeps each tensor's own.
    """
    names = list(template.names)
    source_name = {name: name for name in names}
    tie = tied_embeddings(template) if untie else None
    untied = tie is not None and bool(set(changed) & set(tie))
    if untied and tie is not None:
        if tie[0] not in source_name:
            names.append(tie[0])
        source_name[tie[0]] = tie[1]
    missing = sorted(set(changed) - set(source_name))
    if missing:
        raise UserError(f"{missing[0]} is trained by the run but is not a tensor of {template.folder}")

    def dtype_of(name: str) -> torch.dtype:
        stored = template.dtype(source_name[name])
        return out_dtype if out_dtype is not None and stored.is_floating_point else stored

    specs = [TensorSpec(name, tuple(template.shape(source_name[name])), dtype_of(name)) for name in names]
    model_dtype = dtype_of(next(iter(computed))) if computed else dtype_of(names[0])
    config = dict(template.config)
    config["dtype"] = str(model_dtype).removeprefix("torch.")
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]
    if untied:
        config["tie_word_embeddings"] = False
    return ModelPlan(template, specs, source_name, set(computed), untied, config, model_dtype)


@dataclass(frozen=True, eq=False)
class ModuleUpdate:
    """A trained module's new value W + Σ changes, left uncomputed so that it is written in row blocks.

    weight: (rows, cols) as stored (any float dtype), never modified; changes: factors or dense
    (rows, cols) tensors, added in order in float32 on ``device``. A whole float32 copy of an 8B
    model's MLP weight is 235 MB; a block is at most :data:`COPY_BLOCK_BYTES`.
    """

    weight: torch.Tensor
    changes: tuple[Change, ...]
    device: torch.device

    def block(self, rows: slice) -> torch.Tensor:
        """Rows ``rows`` of W + Σ changes, float32 on the device (a new tensor)."""
        out = self.weight[rows].to(self.device, torch.float32, copy=True)
        for change in self.changes:
            if isinstance(change, torch.Tensor):
                out.add_(change[rows].to(self.device))
            elif change.rank:
                out.addmm_(change.left[rows].to(self.device), change.right.to(self.device).T)
        return out

    def blocks(self, block_bytes: int) -> Iterator[torch.Tensor]:
        """Every row block of the result, in order, each about ``block_bytes`` in float32."""
        rows = self.weight.shape[0]
        step = max(1, block_bytes // (4 * max(1, self.weight[0].numel())))
        for start in range(0, rows, step):
            yield self.block(slice(start, start + step))


def write_model(
    folder: Path,
    plan: ModelPlan,
    compute: Callable[[str], ModuleUpdate],
    *,
    max_shard_size: int,
    ranks: Ranks,
    overrides: Callable[[str], torch.Tensor | None] = lambda name: None,
) -> None:
    """Stream every tensor of ``plan`` into the shards of ``folder``, then the index and ``config.json``.

    ``compute(name)`` gives a trained module's update, computed here in float32 row blocks; each
    block is checked to fit the output dtype (finite, in range) and rounded once. ``overrides(name)``
    may replace a copied tensor (an adapter's carried ``modules_to_save``); everything else is the
    template's, bit-for-bit. Under torchrun each rank writes the shards it owns
    (:class:`~nexttools.writer.ShardedWriter`), and rank 0 writes the index and the config once all
    of them have finished.
    """
    specs = {spec.name: spec for spec in plan.specs}
    with together(ranks), ShardedWriter(folder, max_shard_size, plan.specs, ranks) as writer:
        with progress() as bar:
            task = bar.add_task("writing tensors", total=len(writer.names))
            for name in writer.names:
                _add_tensor(writer, plan, name, specs[name].dtype, compute, overrides)
                bar.advance(task)
        writer.finish()
    if ranks.writer:
        writer.write_index()
        (folder / CONFIG_NAME).write_text(plan.config_text)


def _add_tensor(
    writer: ShardedWriter,
    plan: ModelPlan,
    name: str,
    dtype: torch.dtype,
    compute: Callable[[str], ModuleUpdate],
    overrides: Callable[[str], torch.Tensor | None],
) -> None:
    """Hand tensor ``name`` of ``plan`` to ``writer``: computed, overridden or copied (see write_model)."""
    if name in plan.computed:
        blocks = compute(name).blocks(COPY_BLOCK_BYTES)
        writer.add_pieces(name, (_rounded(name, block, dtype) for block in blocks))
        return
    override = overrides(name)
    if override is None:  # copied in blocks: a 1 GB embedding never sits in memory whole
        copied = plan.template.blocks(plan.source_name[name], COPY_BLOCK_BYTES)
        writer.add_pieces(name, (block.to(dtype) for block in copied))
        return
    writer.add(name, override.to(dtype))


def _rounded(name: str, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 block rounded once to ``dtype``, flat, after checking that it fits.

    NaN fails the comparisons; anything beyond the dtype's range would round to ±inf. (aminmax is
    one pass with no temporary: ~10x cheaper than an inf-norm.) A refusal mid-tensor leaves a partial
    shard in the staging folder, which the caller discards.
    """
    low, high = (float(x) for x in torch.aminmax(exact))
    if not -torch.finfo(dtype).max <= low <= high <= torch.finfo(dtype).max:
        raise UserError(
            f"the extrapolated {name} has non-finite values in {dtype} "
            "(try a smaller --alpha or --dtype float32); nothing was written"
        )
    return exact.to(dtype).reshape(-1)


def model_side_files(model_folder: Path, base_folder: Path, *, remote_code_from: Path) -> dict[str, Path]:
    """Output name -> source of the tokenizer, chat template, generation config and remote code.

    The tokenizer comes from ``model_folder`` when it has one (a run that added tokens saves it with
    the checkpoint), else from the base; so does the generation config. ``*.py`` files are copied from
    ``remote_code_from`` when its config names them through ``auto_map``.
    """
    files = tokenizer_files(model_folder, base_folder)
    for folder in (model_folder, base_folder):
        if (folder / GENERATION_CONFIG).is_file():
            files[GENERATION_CONFIG] = folder / GENERATION_CONFIG
            break
    config = remote_code_from / CONFIG_NAME
    if config.is_file() and json.loads(config.read_text()).get("auto_map"):
        files |= {p.name: p for p in sorted(remote_code_from.glob("*.py"))}
    return files


def tokenizer_files(checkpoint_folder: Path, base_folder: Path) -> dict[str, Path]:
    """The tokenizer and chat-template files, from the checkpoint when it saved any, else the base's."""
    home = (
        checkpoint_folder if any((checkpoint_folder / n).is_file() for n in TOKENIZER_FILES) else base_folder
    )
    return {name: home / name for name in TOKENIZER_FILES if (home / name).is_file()}
