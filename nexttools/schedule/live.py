"""A jump applied to the model in memory: the same α·T̂ that ``extrapolate`` writes, made in place.

For a LoRA run:

- a method that keeps the adapter's rank (``factor-linear``) overwrites each trained module's
  ``lora_A``/``lora_B`` parameters, in place, with the jumped factors ``Jump.new_factors`` gives:
  exactly what ``extrapolate --format checkpoint`` writes into the checkpoint's adapter;
- every other method folds α·T̂ into the frozen base weight of each trained module (PEFT's
  ``base_layer.weight``), in float32 rounded once to its dtype: what ``extrapolate --format base``
  writes. The shift is returned as exact low-rank factors (:attr:`LiveJump.shifts`), for the caller
  to keep (:mod:`nexttools.base_shifts`), since the run's later checkpoints hold only the adapter.

For a full-weight run any method is applied: α·T̂ is added to each trained parameter in float32 and
rounded once to its dtype, and the checkpoints saved afterwards hold the moved weights themselves.

The parameters stay the same objects, so the optimizer's state (Adam's moments, its step counter)
stays attached and unchanged; the LR schedule and the data position are not touched. Extrapolating
the moments too diverged in Leap+Verify (arXiv 2602.19580), so they are left.

A jump that moves any module by more than half its own weight norm is refused before anything
changes (:class:`JumpTooLarge`): the limit ``extrapolate`` applies, since a live run has no ``--force``.
Measured: a ``next`` schedule without it destroyed the example's run at its second jump.

:meth:`LiveJump.revert` puts back the exact tensors the jump replaced (the gate's undo).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nexttools.base_shifts import BaseShifts
from nexttools.errors import UserError
from nexttools.extrapolate_choice import oversized_jump
from nexttools.lowrank import LowRankFactors
from nexttools.methods import METHODS, get_method
from nexttools.methods.base import JumpRequest
from nexttools.predictor.saved import load_predictor
from nexttools.run import Change, OpenedRun
from nexttools.store import open_store
from nexttools.workdir import Workdir

_PEFT_PREFIX = "base_model.model."


class JumpTooLarge(UserError):
    """The jump is refused, nothing changed: it moves a module by more than ``extrapolate``'s limit
    (:func:`nexttools.extrapolate_choice.oversized_jump`), the mark of a diverging prediction."""

    def __init__(self, reason: str, target_step: float) -> None:
        super().__init__(reason)
        self.reason, self.target_step = reason, target_step


@dataclass
class LiveJump:
    """One jump made on a live model: where it jumped from and to, and what it replaced.

    ``step`` is the last stored checkpoint's step (the jump's origin), ``target_step`` where the
    method lands (``claimed_steps`` = target − step); ``replaced`` maps each parameter it changed to
    a copy of its value before the jump.
    """

    method: str
    alpha: float
    step: int
    target_step: float
    seconds: float
    replaced: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = field(repr=False)
    shifts: dict[str, LowRankFactors] = field(default_factory=dict, repr=False)
    """A LoRA run's base shift per module (base orientation) when the jump was folded into the base."""

    @property
    def claimed_steps(self) -> float:
        return self.target_step - self.step

    def revert(self) -> None:
        """Put back, bit for bit, every parameter the jump changed."""
        with torch.no_grad():
            for parameter, before in self.replaced.values():
                parameter.copy_(before)

    def parameters_after(self) -> dict[str, torch.Tensor]:
        """The changed parameters' current values (copies), by name."""
        return {name: parameter.detach().clone() for name, (parameter, _) in self.replaced.items()}


def lora_parameters(
    model: torch.nn.Module, adapter: str = "default"
) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """``{base weight name: (A, B)}`` of every LoRA layer of a PEFT ``model`` for ``adapter``: A
    ``(r, in)`` and B ``(out, r)`` as PEFT holds them (embeddings: ``lora_embedding_A/B``)."""
    found: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    for name, module in model.named_modules():
        weight = name.removeprefix(_PEFT_PREFIX) + ".weight"
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if (
            isinstance(lora_a, torch.nn.ModuleDict)
            and adapter in lora_a
            and isinstance(lora_b, torch.nn.ModuleDict)
        ):
            found[weight] = (_parameter(lora_a[adapter].weight), _parameter(lora_b[adapter].weight))
        emb_a, emb_b = getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None)
        if (
            isinstance(emb_a, torch.nn.ParameterDict)
            and adapter in emb_a
            and isinstance(emb_b, torch.nn.ParameterDict)
        ):
            found[weight] = (_parameter(emb_a[adapter]), _parameter(emb_b[adapter]))
    return found


def _parameter(value: object) -> torch.nn.Parameter:
    if not isinstance(value, torch.nn.Parameter):
        raise UserError("a LoRA layer whose factor is not a parameter: is the model wrapped (FSDP, ZeRO-3)?")
    return value


def jump_live(
    model: torch.nn.Module, workdir: Path, method: str, alpha: float, *, adapter: str = "default"
) -> LiveJump:
    """Jump ``model`` in place from the last checkpoint of ``workdir``'s store (module docstring).

    ``model`` must be the model whose checkpoints the store holds, at the state of its last one (the
    caller updates the store first, with ``extract``). Returns what was done, for the record and
    :meth:`LiveJump.revert`. ``UserError`` (one line, nothing changed) for a method or run this
    cannot jump.
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not (alpha > 0 and alpha == alpha and alpha != float("inf")):
        raise UserError(f"alpha must be a finite number > 0, not {alpha}")
    started = time.monotonic()
    chosen = get_method(method)
    store_path = Workdir(workdir).existing_store()
    with open_store(store_path) as store:
        run = OpenedRun(store)
        predictor = load_predictor(Path(workdir), store) if chosen.needs_predictor else None
        jump = chosen.jump(JumpRequest(run=run, alpha=alpha, predictor=predictor))
        too_large = oversized_jump(run, method, jump)
        if too_large is not None:
            raise JumpTooLarge(too_large, jump.target_step)
        shifts: dict[str, LowRankFactors] = {}
        with _all_or_nothing() as replaced:
            if store.run_kind == "full":
                _move_weights(model, run, jump.change, replaced)
            elif chosen.keeps_rank:
                _move_factors(model, run, jump.new_factors, adapter, replaced)
            else:
                shifts = _fold_into_base(model, run, jump.change, adapter, replaced)
        step = int(run.steps[-1])
    seconds = time.monotonic() - started
    return LiveJump(method, alpha, step, jump.target_step, seconds, replaced, shifts)


@contextmanager
def _all_or_nothing() -> Iterator[dict[str, tuple[torch.nn.Parameter, torch.Tensor]]]:
    """Collect the replaced parameters; on any failure put every one back before re-raising."""
    replaced: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    try:
        yield replaced
    except BaseException:
        with torch.no_grad():
            for parameter, before in replaced.values():
                parameter.copy_(before)
        raise


_Replaced = dict[str, tuple[torch.nn.Parameter, torch.Tensor]]


def _move_factors(
    model: torch.nn.Module,
    run: OpenedRun,
    new_factors: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None,
    adapter: str,
    replaced: _Replaced,
) -> None:
    if new_factors is None:
        raise UserError("this method gives no new factors")  # keeps_rank methods always do
    live = lora_parameters(model, adapter)
    _require_layers(run, live, adapter)
    updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in run.modules:  # computed (and checked) first: nothing is changed until all are ready
        new_a, new_b = new_factors(name)
        param_a, param_b = live[name]
        if tuple(new_a.shape) != tuple(param_a.shape) or tuple(new_b.shape) != tuple(param_b.shape):
            raise UserError(f"{name}: the live adapter's shapes differ from its checkpoint's")
        updates[name] = (new_a, new_b)
    with torch.no_grad():
        for name, (new_a, new_b) in updates.items():
            for suffix, parameter, value in (
                (".lora_A", live[name][0], new_a),
                (".lora_B", live[name][1], new_b),
            ):
                replaced[name + suffix] = (parameter, parameter.detach().clone())
                parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))


def _require_layers(run: OpenedRun, live: Mapping[str, object], adapter: str) -> None:
    missing = [name for name in run.modules if name not in live]
    if missing:
        raise UserError(
            f"the model has no LoRA layer for {missing[0]} (adapter {adapter!r}), which the store holds: "
            "is it the model of this run?"
        )


def _add_low_rank(parameter: torch.nn.Parameter, delta: LowRankFactors) -> None:
    """parameter += left rightᵀ, in float32, rounded once to the parameter's dtype."""
    moved = parameter.detach().float()
    moved.addmm_(delta.left.to(moved.device), delta.right.to(moved.device).T)
    parameter.copy_(moved.to(parameter.dtype))


def base_weights(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    """``{base weight name: frozen base weight}`` of every LoRA layer of a PEFT ``model``."""
    found: dict[str, torch.nn.Parameter] = {}
    for name, module in model.named_modules():
        base_layer = getattr(module, "base_layer", None)
        if name.endswith(".base_layer") or base_layer is None or not _has_adapter(module, adapter):
            continue
        found[name.removeprefix(_PEFT_PREFIX) + ".weight"] = _parameter(base_layer.weight)
    return found


def _has_adapter(module: torch.nn.Module, adapter: str) -> bool:
    return any(
        isinstance(side, torch.nn.ModuleDict | torch.nn.ParameterDict) and adapter in side
        for side in (getattr(module, "lora_A", None), getattr(module, "lora_embedding_A", None))
    )


def _fold_into_base(
    model: torch.nn.Module,
    run: OpenedRun,
    change: Callable[[str], Change],
    adapter: str,
    replaced: _Replaced,
) -> dict[str, LowRankFactors]:
    """Add each module's change to its frozen base weight; return the changes (the shifts)."""
    live = base_weights(model, adapter)
    _require_layers(run, live, adapter)
    owners: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    shifts: dict[str, LowRankFactors] = {}
    for name in run.modules:  # computed (and checked) first: nothing is changed until all are ready
        delta = change(name)
        assert isinstance(delta, LowRankFactors), "a LoRA run's jump is low rank"
        parameter = live[name]
        if len(owners.get(id(parameter), [])) > 1:
            raise UserError(
                f"{name} is tied to {owners[id(parameter)][1]}: folding a jump into it would move both; "
                "jump with factor-linear, or untie the weights"
            )
        if not parameter.is_floating_point() or delta.shape != tuple(parameter.shape):
            raise UserError(
                f"{name}: the live base weight is quantized or shaped unlike the store's "
                f"({parameter.dtype}, {tuple(parameter.shape)}): jump with factor-linear"
            )
        shifts[name] = delta
    with torch.no_grad():
        for name, delta in shifts.items():
            parameter = live[name]
            replaced[name] = (parameter, parameter.detach().clone())
            _add_low_rank(parameter, delta)
    return shifts


def fold_shifts(
    model: torch.nn.Module, shifts: BaseShifts, steps: Collection[int], adapter: str = "default"
) -> None:
    """Fold the kept base shifts made at ``steps`` into ``model``'s frozen base weights again: a run
    resumed from a checkpoint after such a jump starts from the original base, which the trainer
    loaded before the adapter."""
    live = base_weights(model, adapter)
    singles = [
        (step, BaseShifts((step,), (path,)))
        for step, path in zip(shifts.steps, shifts.paths, strict=True)
        if step in steps
    ]
    # read (and checked) first: nothing is changed until every shift is ready
    folds = [(live[name], single.at(step, name)) for step, single in singles for name in live]
    with torch.no_grad():
        for parameter, delta in folds:
            assert delta is not None
            _add_low_rank(parameter, delta)


def _move_weights(
    model: torch.nn.Module, run: OpenedRun, change: Callable[[str], Change], replaced: _Replaced
) -> None:
    parameters = dict(model.named_parameters())
    missing = [name for name in run.modules if name not in parameters]
    if missing:
        raise UserError(f"the model has no parameter {missing[0]}, which the store holds: is it this run's?")
    with torch.no_grad():
        for name in run.modules:
            delta = change(name)
            dense = delta if isinstance(delta, torch.Tensor) else delta.left @ delta.right.T
            parameter = parameters[name]
            replaced[name] = (parameter, parameter.detach().clone())
            moved = parameter.detach().float() + dense.to(device=parameter.device, dtype=torch.float32)
            parameter.copy_(moved.to(parameter.dtype))
