"""``JumpCallback``: repeated in-place jumps inside a Hugging Face Trainer (TRL's GRPOTrainer included).

    from nexttools.schedule.callback import JumpCallback

    trainer = GRPOTrainer(model=peft_model, args=GRPOConfig(save_steps=10, ...), ...)
    JumpCallback("nexttools-run", every=50, start=100, method="factor-linear", alpha=1.5).attach(trainer)
    trainer.train()

At every scheduled step (``start``, ``start + every``, … ; each must be a save step), right after the
trainer has saved ``checkpoint-N``:

1. the store in ``workdir`` is brought up to date with the checkpoints saved so far (``extract``,
   incremental: a few new rows), and for ``next`` its predictor is trained again (``fit``);
2. with a ``gate``, the live model is scored (``gate(model) -> float``, higher is better);
3. the jump is computed and applied to the live model (:func:`nexttools.schedule.live.jump_live`):
   ``factor-linear`` moves the adapter's own A and B, every other method of a LoRA run is folded
   into the frozen base weights; the optimizer's moments, the step counter, the LR schedule and the
   data position do not change;
4. with a gate, the model is scored again; a lower score reverts the jump exactly. A jump that would
   move a module by more than half its weight norm is not made at all (``extrapolate``'s limit: the
   mark of a diverging prediction); the run goes on, and the record says why;
5. a kept factor-space jump is written into ``checkpoint-N``'s own adapter (the files it replaced
   are kept in ``<workdir>/jumps/step-N/``), so that a resume from ``checkpoint-N`` (TRL's
   ``resume_from_checkpoint``) and the next store update continue from the jumped weights; a kept
   base shift is kept as ``<workdir>/jumps/step-N/base-shift.safetensors``, which the store's deltas
   include from checkpoint N on, and which a resumed run folds into its base again at its first step;
6. the jump is logged into the trainer's logs (``jump/*`` keys) and recorded in
   ``<workdir>/jumps.json`` (:mod:`nexttools.jump_record`); a resumed run reads it and jumps again on
   schedule after its resume step.

When the trainer is attached (:meth:`JumpCallback.attach`), the next vLLM weight sync is forced
(TRL syncs when ``global_step != _last_loaded_step``). Multi-process runs (DDP, DeepSpeed, FSDP)
are refused in one line at the start of training: their parameters are sharded or replicated across
processes, and the jump would have to be gathered and broadcast; use the offline loop there
(``docs/jumping.md``).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from nexttools.base_shifts import BaseShifts, save_shift
from nexttools.console import warn
from nexttools.errors import UserError
from nexttools.extract import ExtractOptions, extract
from nexttools.fit import FitOptions, fit
from nexttools.jump_record import JumpEntry, read_jumps, record_jump
from nexttools.methods import METHODS
from nexttools.schedule.live import JumpTooLarge, LiveJump, fold_shifts, jump_live
from nexttools.workdir import Workdir

Gate = Callable[[torch.nn.Module], float]
"""Scores the live model, higher is better (e.g. accuracy on a small validation split)."""


class JumpCallback(TrainerCallback):
    """Jump the live model every ``every`` steps from step ``start`` (module docstring).

    Args:
        workdir: nexttools' working folder for this run (its store, record and kept adapters).
        every: steps between jumps (a multiple of the trainer's ``save_steps``).
        start: the first jump's step (a save step).
        method: any registered method. For a LoRA run, ``factor-linear`` moves the adapter's own
            A and B; every other method is folded into the frozen base, and its shift is kept in
            ``workdir`` (:mod:`nexttools.base_shifts`).
        alpha: the jump's α (the target step is ``N + α·k·Δ``, Δ the checkpoint spacing).
        k: the store's horizon, in checkpoints.
        base: the base model for ``extract`` (default: the adapters' ``base_model_name_or_path``).
        gate: keep a jump only if ``gate(model)`` does not drop (None: keep every jump).
        stop: no jump at or after this step (None: until training ends).
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        every: int,
        start: int,
        method: str = "factor-linear",
        alpha: float = 1.5,
        k: int = 5,
        base: str | None = None,
        gate: Gate | None = None,
        stop: int | None = None,
    ) -> None:
        for name, value in (("every", every), ("start", start), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"JumpCallback: {name} must be a positive integer, not {value!r}")
        if method not in METHODS:
            raise UserError(f"JumpCallback: unknown method {method!r}; choose from {', '.join(METHODS)}")
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
            raise UserError(f"JumpCallback: alpha must be a finite number > 0, not {alpha!r}")
        if gate is not None and not callable(gate):
            raise UserError("JumpCallback: gate must be a callable taking the model and returning a score")
        self.workdir = Path(workdir)
        self.every, self.start, self.stop = every, start, stop
        self.method, self.alpha, self.k, self.base, self.gate = method, float(alpha), k, base, gate
        self.trainer: Any = None
        self._done: set[int] = set()
        self._folded: set[int] = set()  # base shifts folded into the live model by this callback
        self._resume_checked = False

    def attach(self, trainer: Any) -> JumpCallback:
        """Add this callback to ``trainer`` and let it force the trainer's next weight sync."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def scheduled(self, step: int) -> bool:
        """Whether the schedule jumps at ``step``."""
        in_range = step >= self.start and (self.stop is None or step < self.stop)
        return in_range and (step - self.start) % self.every == 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _check_single_process(args)
        if self.every % max(int(args.save_steps), 1) or self.start % max(int(args.save_steps), 1):
            raise UserError(
                f"JumpCallback: every ({self.every}) and start ({self.start}) must be multiples of "
                f"save_steps ({args.save_steps}): a jump starts from a saved checkpoint"
            )
        self._resume_checked = False

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._resume_checked:
            return
        self._resume_checked = True  # the first step: the trainer has restored its resume step by now
        # A resumed run knows the jumps made up to its resume step (later entries are redone), and
        # folds the base shifts kept up to it into the base the trainer loaded (the original one).
        resumed = state.global_step
        self._done = {entry.step for entry in read_jumps(self.workdir) if entry.step <= resumed}
        shifts = BaseShifts.of_workdir(self.workdir)
        pending = {step for step in shifts.steps if step <= resumed} - self._folded
        model = kwargs.get("model")
        if pending and model is not None:
            fold_shifts(model, shifts, pending)
            self._folded |= pending

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = state.global_step
        model = kwargs.get("model")
        if not self.scheduled(step) or step in self._done or model is None:
            return
        run = Path(args.output_dir or ".")
        checkpoint = run / f"checkpoint-{step}"
        started = time.monotonic()
        extract(ExtractOptions(run=run, base=self.base, workdir=self.workdir, k=self.k))
        if METHODS[self.method].needs_predictor:  # `next`: trained again on the grown store
            fit(FitOptions(workdir=self.workdir))
        seconds_update = time.monotonic() - started
        before = self._score(model)
        try:
            jump = jump_live(model, self.workdir, self.method, self.alpha)
        except JumpTooLarge as refused:  # the run goes on unjumped, and the record says why
            entry = JumpEntry(
                step=step,
                method=self.method,
                alpha=self.alpha,
                target_step=refused.target_step,
                claimed_steps=refused.target_step - step,
                kept=False,
                seconds_update=seconds_update,
                refused=refused.reason,
            )
            warn(f"JumpCallback: no jump at step {step}: {refused.reason}")
        else:
            entry = self._settle(model, jump, before, checkpoint, seconds_update)
        record_jump(self.workdir, entry)
        self._done.add(step)
        self._log(state, entry)
        if self.trainer is not None and hasattr(self.trainer, "_last_loaded_step"):
            self.trainer._last_loaded_step = -1  # TRL + vLLM: push the jumped weights at the next sync

    def _settle(
        self, model: torch.nn.Module, jump: LiveJump, before: float | None, checkpoint: Path, seconds: float
    ) -> JumpEntry:
        """Score the jumped model, then keep the jump (written where the run reads it) or revert it."""
        after = self._score(model)
        kept = before is None or after is None or after >= before
        if not kept:
            jump.revert()
        elif jump.shifts:  # folded into the frozen base: the checkpoint's adapter is unchanged
            save_shift(self.workdir, jump.step, jump.shifts)
            self._folded.add(jump.step)
        else:
            _keep_in_checkpoint(model, checkpoint, Workdir(self.workdir).jump_states / f"step-{jump.step}")
        return JumpEntry(
            step=jump.step,
            method=self.method,
            alpha=self.alpha,
            target_step=jump.target_step,
            claimed_steps=jump.claimed_steps,
            kept=kept,
            score_before=before,
            score_after=after,
            seconds_update=seconds,
            seconds_jump=jump.seconds,
            base_shift=kept and bool(jump.shifts),
        )

    def _score(self, model: torch.nn.Module) -> float | None:
        if self.gate is None:
            return None
        was_training = model.training
        model.eval()
        # The gate may sample (and seed): the run's own random streams are put back afterwards, so a
        # gated run whose jumps are all reverted is the ungated run, draw for draw.
        python_state, numpy_state = random.getstate(), np.random.get_state()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                score = float(self.gate(model))
        finally:
            model.train(was_training)
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        if not math.isfinite(score):
            raise UserError(f"JumpCallback: the gate returned {score}, not a finite score")
        return score

    def _log(self, state: TrainerState, entry: JumpEntry) -> None:
        logs: dict[str, float] = {
            "jump/step": float(entry.step),
            "jump/alpha": entry.alpha,
            "jump/claimed_steps": entry.claimed_steps,
            "jump/kept": float(entry.kept),
            "jump/seconds": entry.seconds_update + entry.seconds_jump,
        }
        if entry.score_before is not None and entry.score_after is not None:
            logs |= {"jump/score_before": entry.score_before, "jump/score_after": entry.score_after}
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": entry.step})


def _check_single_process(args: TrainingArguments) -> None:
    """Refuse what a live jump cannot do correctly (module docstring)."""
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None) or args.world_size > 1:
        raise UserError(
            "JumpCallback jumps a model held whole in one process; this run is distributed "
            f"(world size {args.world_size}, DeepSpeed or FSDP): use the offline loop (docs/jumping.md)"
        )


def _keep_in_checkpoint(model: torch.nn.Module, checkpoint: Path, kept_as: Path) -> None:
    """Keep ``checkpoint``'s weight files in ``kept_as/``, then save the jumped model into it."""
    kept_as.mkdir(parents=True, exist_ok=True)
    weights = [p for pattern in ("*.safetensors", "*.bin", "*.index.json") for p in checkpoint.glob(pattern)]
    for path in weights:  # the adapter, or a full model's shards and index; not the optimizer's files
        if path.name not in ("training_args.bin",) and not path.name.startswith(
            ("optimizer", "scheduler", "rng")
        ):
            shutil.copyfile(path, kept_as / path.name)
    save = getattr(model, "save_pretrained", None)
    if save is None:
        raise UserError("JumpCallback: the model has no save_pretrained; a jump cannot be written")
    save(str(checkpoint))
