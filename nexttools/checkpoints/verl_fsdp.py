"""verl ≥ 0.8 (FSDP engine) LoRA checkpoints: the adapter inside ``model_world_size_W_rank_R.pt``.

Since verl 0.8 a LoRA run's ``global_step_N/actor/`` holds no ``lora_adapter/`` folder: each rank
``torch.save``s its ``model.state_dict()``, DTensors sharded on the FSDP mesh (``Shard(0)``; HSDP
adds a ``Replicate`` mesh dimension; plain tensors at W = 1), with every base weight beside the LoRA
tensors unless ``checkpoint.save_lora_only``. ``fsdp_config.json`` gives ``world_size``;
``lora_train_meta.json`` gives ``r`` and ``lora_alpha``, which live nowhere else.

Reading, safely and cheaply:

- ``torch.load(weights_only=True, mmap=True)`` after importing ``torch.distributed.tensor``, which
  registers DTensor and its mesh and placements as weights-only globals (never the ``safe_globals``
  context manager: it unregisters them on exit). No process group is needed.
- With ``mmap=True`` only the tensors touched are paged in: the LoRA tensors, not the base weights.
- A DTensor is reassembled from the ranks' local tensors, in mesh order, along its ``Shard`` dim
  (FSDP2 local tensors are unpadded, so uneven splits just concatenate); a ``Replicate`` dim takes
  its first replica. ``Partial`` and ``_StridedShard`` (FSDP + TP) are refused.
- Optimizer, ``extra_state`` and ``data.pt`` files are never opened: they are plain pickles.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nexttools.checkpoints.jsonfile import read_json_object
from nexttools.checkpoints.keys import LORA_KEY, lora_module_paths
from nexttools.errors import UserError
from nexttools.options import MAX_COUNT

FSDP_CONFIG = "fsdp_config.json"
LORA_META = "lora_train_meta.json"


def is_verl_fsdp(folder: Path) -> bool:
    """Whether ``folder`` is a verl FSDP-engine ``actor/`` folder (it has ``fsdp_config.json``)."""
    return (folder / FSDP_CONFIG).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(
        path, missing=f"{path} is missing: verl writes it beside the FSDP shards of a LoRA run"
    )


def rank_files(folder: Path) -> list[Path]:
    """``model_world_size_W_rank_R.pt`` for R in 0 … W−1 (W from ``fsdp_config.json``); each must exist."""
    config = _read_json(folder / FSDP_CONFIG)
    world = config.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise UserError(f"{folder / FSDP_CONFIG}: world_size {world!r} is not a positive integer")
    present = len(list(folder.glob("model_world_size_*_rank_*.pt")))
    if world > present:  # checked before naming W files: a hostile W of 10**9 costs nothing
        missing = next(
            folder / f"model_world_size_{world}_rank_{rank}.pt"
            for rank in range(present + 1)
            if not (folder / f"model_world_size_{world}_rank_{rank}.pt").is_file()
        )
        raise UserError(
            f"{missing} is missing: {FSDP_CONFIG} says world_size {world}, and {present} rank files are there"
        )
    files = [folder / f"model_world_size_{world}_rank_{rank}.pt" for rank in range(world)]
    for path in files:
        if not path.is_file():
            raise UserError(f"{path} is missing: an FSDP checkpoint of world size {world} needs every rank")
    return files


def lora_config(folder: Path, module_paths: list[str]) -> dict[str, Any]:
    """An ``adapter_config.json`` equivalent from ``lora_train_meta.json`` and the modules in the shards."""
    meta = _read_json(folder / LORA_META)
    if "r" not in meta or "lora_alpha" not in meta:
        raise UserError(f"{folder / LORA_META}: needs r and lora_alpha")
    rank, alpha = meta["r"], meta["lora_alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= MAX_COUNT:
        raise UserError(f"{folder / LORA_META}: r {rank!r} is not a positive integer")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise UserError(f"{folder / LORA_META}: lora_alpha {alpha!r} is not a finite positive number")
    targets = sorted({path.rsplit(".", 1)[-1] for path in module_paths})
    return {
        "peft_type": "LORA",
        "r": meta["r"],
        "lora_alpha": meta["lora_alpha"],
        "task_type": meta.get("task_type"),
        "target_modules": targets,
        "use_rslora": False,  # verl has no rsLoRA
    }


def _load(path: Path) -> dict[str, Any]:
    import torch.distributed.tensor  # registers DTensor & co. as weights-only globals

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # weights_only: nothing ran; any failure is damage
        raise UserError(f"{path}: not a readable weights-only torch file ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict")
    return state


def _assemble(key: str, values: list[Any], files: list[Path]) -> torch.Tensor:
    """The full tensor ``key`` from its value in every rank's state dict."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    first = values[0]
    if not isinstance(first, DTensor):
        if len(values) == 1 and isinstance(first, torch.Tensor):
            return first.detach().clone()
        raise UserError(f"{files[0]}: {key} is a {type(first).__name__}, not a DTensor of the FSDP mesh")
    mesh = first.device_mesh.mesh  # the global rank at every mesh coordinate
    shard_dim: int | None = None
    for placement in first.placements:
        if type(placement) is Shard and shard_dim is None:
            shard_dim = placement.dim
        elif type(placement) is not Replicate:
            raise UserError(
                f"{files[0]}: {key} is placed as {placement} (FSDP + tensor parallel?), "
                "which is not supported"
            )
    ranks = sorted(int(rank) for rank in mesh.reshape(-1).tolist())
    if ranks != list(range(len(values))):
        raise UserError(
            f"{files[0]}: the mesh of {key} maps ranks {ranks[:8]}, "
            f"not each of the {len(values)} rank files once"
        )
    for value, path in zip(values, files, strict=True):
        if not (isinstance(value, DTensor) and isinstance(value._local_tensor, torch.Tensor)):
            raise UserError(f"{path}: {key} is not a DTensor holding a local tensor")
        if value.placements != first.placements or value.shape != first.shape:
            raise UserError(f"{path}: {key} is placed or shaped unlike rank 0's")
    pieces = [values[rank]._local_tensor.detach() for rank in _rank_order(mesh, first.placements)]
    whole = pieces[0].clone() if shard_dim is None else torch.cat(pieces, dim=shard_dim)
    if whole.shape != first.shape:
        raise UserError(
            f"{files[0]}: the local shards of {key} make {tuple(whole.shape)}, "
            f"not its global {tuple(first.shape)}"
        )
    return whole


def _rank_order(mesh: torch.Tensor, placements: tuple[Any, ...]) -> list[int]:
    """The ranks whose local tensors make up the whole: index 0 along every ``Replicate`` mesh dim,
    all coordinates (in order) along the ``Shard`` one."""
    from torch.distributed.tensor import Replicate

    picked = mesh
    for mesh_dim in reversed(range(mesh.ndim)):
        if type(placements[mesh_dim]) is Replicate:
            picked = picked.select(mesh_dim, 0)
    return [int(rank) for rank in picked.reshape(-1).tolist()]


class VerlShards:
    """The LoRA tensors of a verl ``actor/`` folder: shapes up front, each tensor assembled on demand.

    The rank files stay memory-mapped (``mmap=True``), so only the tensors asked for are ever paged
    in, one at a time: memory is one LoRA tensor, not the shards, nor the run's adapters.
    ``config`` is built from ``lora_train_meta.json`` (``config_path``); ``files`` are what a
    fingerprint covers (the rank files and the two JSON files). A
    :class:`nexttools.checkpoints.sharded.ShardedAdapter`.
    """

    def __init__(self, folder: Path) -> None:
        rank_paths = rank_files(folder)
        self._files = rank_paths
        self._states = [_load(path) for path in rank_paths]
        keys = [key for key in self._states[0] if LORA_KEY.search(key)]
        if not keys:
            raise UserError(
                f"{rank_paths[0]}: holds no LoRA tensors (lora_A/lora_B): is this a full-weight run?"
            )
        for key in keys:
            missing = [path for path, state in zip(rank_paths, self._states, strict=True) if key not in state]
            if missing:
                raise UserError(f"{missing[0]}: has no {key}, which rank 0 holds")
        self.shapes = {key: tuple(self._states[0][key].shape) for key in keys}  # DTensor: the global shape
        self.config_path = folder / LORA_META
        self.config = lora_config(folder, lora_module_paths(keys))
        self.files = [*rank_paths, folder / FSDP_CONFIG, self.config_path]

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key``, whole (float32 as stored), in a new buffer."""
        return _assemble(key, [state[key] for state in self._states], self._files)
