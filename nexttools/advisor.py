"""``nexttools backtest --eval-cmd``: what a jump is worth on this run, scored by the task's own eval.

The parameter-space figures of ``fit`` do not say what a jump buys; this does. From an origin
checkpoint o (by default k checkpoints before the last), using only what the run knew then (the
predictor is refit on the target rows that checkpoints ≤ o determine, rows 0 … o−k), every
registered method jumps at every α of ``alphas``. Each jump is written merged into a scratch folder
in the workdir, scored by the user's eval command and deleted, so disk holds one model at a time;
the real checkpoints o … last are scored the same way (written as the method-free model W_r). The
worth of each jump is read off the real curve (:mod:`nexttools.worth`).

**Recommendation.** Among the jumps worth at least :data:`MIN_WORTH` of the steps they claim, the one
worth the most real steps (a lower bound counts as its bound; ties go to the higher worth): a jump
that claims 3·k·Δ steps and delivers 60 % of them saves more than a perfect one that claims k·Δ.
None worth half its claim: **do not extrapolate this run**. Because the real run ends k checkpoints
after the default origin, a jump with α > 1 can show at most 1/α of its claim there (a lower bound);
``--origin`` further back measures longer jumps.

The verdict is saved as ``<workdir>/backtest.json`` (tied to the store's fingerprint); ``fit`` and
``extrapolate`` record it in the predictor config, the manifest and the model card, and
``extrapolate`` warns when the chosen (method, α) was judged not worth a jump.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nexttools.console import progress
from nexttools.device import resolve_device
from nexttools.disk import require_free
from nexttools.errors import UserError
from nexttools.evaluation import DEFAULT_TIMEOUT, EvalCommand, ScoreCache, model_fingerprint, run_eval
from nexttools.methods import METHODS, Jump, JumpRequest, Method, get_method
from nexttools.options import CheckedOptions, device_option, option, store_option, workdir_option
from nexttools.outputs import OutputRequest, get_output
from nexttools.predictor import (
    DEFAULT_DEPTH,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_WIDTH,
    Architecture,
    TrainedPredictor,
    train_predictor,
)
from nexttools.predictor.saved import read_config
from nexttools.ranks import ALONE
from nexttools.run import OpenedRun
from nexttools.store import TrajectoryStore, open_store
from nexttools.store.trajectory import Trajectory
from nexttools.verdict import MIN_WORTH, save_verdict
from nexttools.workdir import Workdir
from nexttools.worth import RealCurve

DEFAULT_ALPHAS = (0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_ORIGINS = 3
"""Origins per back-test: one refit and one set of jumps each (the real checkpoints' scores are cached)."""
_SHARD_SIZE = 5 * 10**9


@dataclass(frozen=True)
class BacktestOptions(CheckedOptions):
    """Inputs of :func:`backtest`. ``origin`` is a checkpoint's *step* (None: k checkpoints before the
    last); ``methods`` empty means every registered one; ``device`` as for ``fit``."""

    eval_cmd: str = option(
        dataclasses.MISSING,
        "Command that scores the model folder {model} (higher is better) on its last stdout line; run "
        "without a shell, {model} replaced inside its arguments.",
    )
    eval_shell: bool = option(
        False,
        'Run --eval-cmd with /bin/sh (pipes, cd, &&); it then reads the folder from "$NEXTTOOLS_MODEL" '
        "and may not contain {model}.",
    )
    eval_timeout: float = option(
        DEFAULT_TIMEOUT, "Seconds one evaluation may take before its processes are ended.", kind="positive"
    )
    workdir: Path = workdir_option()
    store: Path | None = store_option()
    origin: int | None = option(
        None,
        "Step of the latest checkpoint to jump from [default: k checkpoints before the last].",
        kind="step",
    )
    origins: int = option(
        DEFAULT_ORIGINS,
        "Origins to jump from, ⌈k/2⌉ checkpoints apart, ending at --origin: worth is their mean ± sd.",
        kind="count",
    )
    alphas: tuple[float, ...] = option(
        DEFAULT_ALPHAS, "α to try (repeat the option).", flag="--alpha", kind="alpha"
    )
    methods: tuple[str, ...] = option(
        (),
        "Method to try (repeat the option) [default: every one].",
        flag="--method",
        choices=lambda: tuple(METHODS),
    )
    device: str = device_option()

    @property
    def eval_command(self) -> EvalCommand:
        """The eval command, checked (``UserError`` naming the flag that is wrong)."""
        return EvalCommand(self.eval_cmd, self.eval_shell, self.eval_timeout)


@dataclass(frozen=True)
class JumpWorth:
    """One scored jump: its score, the real steps it is worth, and worth = steps / claimed steps."""

    method: str
    alpha: float
    score: float
    claimed_steps: float
    steps_worth: float
    worth: float
    lower_bound: bool


@dataclass(frozen=True)
class Spread:
    """One (method, α) over every origin it jumped from: worth's mean, sample sd (0 for one origin)
    and minimum, and the mean real steps it was worth."""

    method: str
    alpha: float
    origins: int
    worth_mean: float
    worth_sd: float
    worth_min: float
    steps_worth_mean: float
    claimed_steps: float
    lower_bound: bool


@dataclass(frozen=True)
class Verdict:
    """The back-test's result (the ``backtest --json`` document is :meth:`document`). ``results`` and
    ``real`` are those of the latest origin (``origin_step``); ``spreads`` are over ``origin_steps``;
    the recommendation is made from the spreads."""

    origin_step: int
    k: int
    results: list[JumpWorth]
    real: list[tuple[int, float]]
    recommendation: tuple[str, float] | None
    reason: str
    skipped: dict[str, str] = field(default_factory=dict)
    evaluated: int = 0
    cached: int = 0
    origin_steps: tuple[int, ...] = ()
    spreads: list[Spread] = field(default_factory=list)
    per_origin: dict[int, list[JumpWorth]] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        return {
            "origin_step": self.origin_step,
            "origin_steps": list(self.origin_steps),
            "spreads": [asdict(s) for s in self.spreads],
            "per_origin": {str(step): [asdict(r) for r in rows] for step, rows in self.per_origin.items()},
            "k": self.k,
            "results": [asdict(r) for r in self.results],
            "real": [{"step": step, "score": score} for step, score in self.real],
            "recommendation": None
            if self.recommendation is None
            else {"method": self.recommendation[0], "alpha": self.recommendation[1]},
            "reason": self.reason,
            "skipped": self.skipped,
            "evaluated": self.evaluated,
            "cached": self.cached,
        }


def origin_row(steps: np.ndarray, k: int, origin: int | None) -> int:
    """The row of the origin checkpoint: the one at step ``origin``, or k checkpoints before the last."""
    count = len(steps)
    if origin is None:
        if count < k + 2:
            raise UserError(
                f"the store has {count} checkpoints; the back-test jumps from k={k} checkpoints before "
                f"the last and needs at least k+2 = {k + 2} (or pass --origin STEP)"
            )
        return count - 1 - k
    rows = np.flatnonzero(steps == origin)
    if len(rows) == 0:
        raise UserError(f"no checkpoint at step {origin} (--origin); the run has steps {_listing(steps)}")
    row = int(rows[0])
    if row == count - 1:
        raise UserError(f"--origin {origin} is the last checkpoint: the back-test needs real steps after it")
    return row


def _listing(steps: np.ndarray) -> str:
    values = [str(int(s)) for s in steps]
    return ", ".join(values) if len(values) <= 12 else ", ".join([*values[:5], "…", *values[-5:]])


def backtest(options: BacktestOptions) -> Verdict:
    """Score every (method, α) jump from the origin and the real checkpoints after it (module docstring)."""
    command = options.eval_command  # checked before anything is read
    if not options.alphas or 0.0 in options.alphas:
        raise UserError("--alpha 0 claims no steps, so there is nothing to score: give α > 0")
    methods = [get_method(name) for name in options.methods] if options.methods else list(METHODS.values())
    workdir = Path(options.workdir)
    store_path = Workdir(workdir, options.store).existing_store()
    with open_store(store_path) as store:
        verdict = _backtest(options, store, methods)
        save_verdict(workdir, store, {**verdict.document(), "eval_cmd": command.cache_key})
    return verdict


def origin_rows(steps: np.ndarray, k: int, origin: int | None, count: int) -> list[int]:
    """Up to ``count`` origin rows, ⌈k/2⌉ checkpoints apart, ending at :func:`origin_row` (earliest
    first); an origin needs a checkpoint before it, so fewer may come back on a short run."""
    last = origin_row(steps, k, origin)
    spacing = max(1, math.ceil(k / 2))
    return sorted({last - j * spacing for j in range(count) if last - j * spacing >= 1} | {last})


def _backtest(options: BacktestOptions, store: TrajectoryStore, methods: list[Method]) -> Verdict:
    trajectory = Trajectory.from_store(store)
    run = OpenedRun(store, trajectory)
    origins = origin_rows(run.steps, run.k, options.origin, options.origins)
    for row in range(origins[-1] + 1):
        run.checkpoint(row)  # every file the jumps read is checked before the first evaluation
    # The real checkpoints first (every origin's curve): a broken eval fails before any refit.
    real_rows = list(range(origins[0], run.rows))
    real_scores, evaluated, cached = _score_all(
        options, [(f"checkpoint step {run.steps[r]}", *_unchanged(run.up_to(r))) for r in real_rows]
    )
    score_of = dict(zip(real_rows, real_scores, strict=True))
    per_origin: dict[int, list[JumpWorth]] = {}
    skipped: dict[str, str] = {}
    for o in origins:
        results, origin_skipped, counts = _from_origin(options, run, trajectory, o, methods, score_of)
        per_origin[int(run.steps[o])] = results
        for name, why in origin_skipped.items():  # the first origin that could not try it says why
            skipped.setdefault(name, f"from step {run.steps[o]}: {why}" if len(origins) > 1 else why)
        evaluated, cached = evaluated + counts[0], cached + counts[1]
    spreads = spread_over_origins(per_origin)
    recommendation, reason = recommend(spreads)
    latest = origins[-1]
    real = [(int(run.steps[r]), score_of[r]) for r in range(latest, run.rows)]
    return Verdict(
        int(run.steps[latest]),
        run.k,
        per_origin[int(run.steps[latest])],
        real,
        recommendation,
        reason,
        skipped,
        evaluated,
        cached,
        tuple(per_origin),
        spreads,
        per_origin,
    )


def _from_origin(
    options: BacktestOptions,
    run: OpenedRun,
    trajectory: Trajectory,
    o: int,
    methods: list[Method],
    score_of: dict[int, float],
) -> tuple[list[JumpWorth], dict[str, str], tuple[int, int]]:
    """Every (method, α) jump from origin row ``o``, scored and read off the real curve from ``o``."""
    steps = run.steps
    origin = run.up_to(o)
    curve = RealCurve.of(
        [int(steps[r]) for r in range(o, run.rows)], [score_of[r] for r in range(o, run.rows)]
    )
    skipped: dict[str, str] = {}
    predictor = None
    if any(m.needs_predictor for m in methods):
        predictor, reason = _refit(options, trajectory, o)
        if reason:
            skipped.update({m.name: reason for m in methods if m.needs_predictor})
    jumps: list[tuple[str, float, Jump]] = []
    for method in methods:
        if method.name in skipped:
            continue
        if method.lora_only and run.kind != "lora":
            skipped[method.name] = "it applies to LoRA runs only"
            continue
        try:
            jumps += [
                (method.name, alpha, method.jump(JumpRequest(origin, alpha, predictor)))
                for alpha in options.alphas
            ]
        except UserError as error:
            skipped[method.name] = str(error)
    scores, evaluated, cached = _score_all(
        options,
        [(f"{name} at α={alpha:g} from step {steps[o]}", origin, jump) for name, alpha, jump in jumps],
    )
    results = []
    for (name, alpha, jump), score in zip(jumps, scores, strict=True):
        claimed = jump.target_step - float(steps[o])
        worth_steps, bound = curve.steps_to_reach(score)
        results.append(JumpWorth(name, alpha, score, claimed, worth_steps, worth_steps / claimed, bound))
    return results, skipped, (evaluated, cached)


def spread_over_origins(per_origin: dict[int, list[JumpWorth]]) -> list[Spread]:
    """Each (method, α)'s worth over the origins that scored it, in the order first seen."""
    grouped: dict[tuple[str, float], list[JumpWorth]] = {}
    for results in per_origin.values():
        for r in results:
            grouped.setdefault((r.method, r.alpha), []).append(r)
    spreads = []
    for (method, alpha), rows in grouped.items():
        worths = [r.worth for r in rows]
        spreads.append(
            Spread(
                method,
                alpha,
                len(rows),
                float(np.mean(worths)),
                float(np.std(worths, ddof=1)) if len(rows) > 1 else 0.0,
                float(min(worths)),
                float(np.mean([r.steps_worth for r in rows])),
                float(np.mean([r.claimed_steps for r in rows])),
                any(r.lower_bound for r in rows),
            )
        )
    return spreads


def _unchanged(run: OpenedRun) -> tuple[OpenedRun, Jump]:
    """``run``'s last checkpoint as it is: a zero change (for LoRA, W_0 + the checkpoint's ΔW)."""
    return run, Jump(target_step=float(run.steps[-1]), change=lambda name: run.combination(name, {}))


def _refit(
    options: BacktestOptions, trajectory: Trajectory, o: int
) -> tuple[TrainedPredictor | None, str | None]:
    """The predictor trained on target rows 0 … o−k only, with the workdir's ``fit`` settings."""
    rows = np.arange(o - trajectory.k + 1)
    if len(rows) == 0:
        return None, f"the predictor needs k+1 = {trajectory.k + 1} checkpoints up to the origin to train on"
    config = read_config(Path(options.workdir))
    architecture = config.architecture if config else Architecture(DEFAULT_WIDTH, DEFAULT_DEPTH)
    try:
        predictor, _ = train_predictor(
            trajectory,
            rows,
            architecture=architecture,
            epochs=config.training.epochs if config else DEFAULT_EPOCHS,
            lr=config.training.lr if config else DEFAULT_LR,
            seed=config.training.seed if config else 0,
            device=resolve_device(options.device),
            label="refit to the origin",
        )
    except UserError as error:
        return None, str(error)
    return predictor, None


def _score_all(
    options: BacktestOptions, evaluations: list[tuple[str, OpenedRun, Jump]]
) -> tuple[list[float], int, int]:
    """Write each model into one scratch folder, score it (or take its cached score), delete it."""
    command = options.eval_command
    cache = ScoreCache(Path(options.workdir), command)
    output = get_output("merged")
    device = resolve_device(options.device)
    scores: list[float] = []
    evaluated = cached = 0
    scratch = Path(tempfile.mkdtemp(prefix=".backtest-", dir=options.workdir))
    try:
        with progress() as bar:
            task = bar.add_task("evaluating", total=len(evaluations))
            for label, run, jump in evaluations:
                bar.update(task, description=label)
                folder = scratch / "model"
                plan = output.plan(OutputRequest(run, jump, None, _SHARD_SIZE, None, device))
                require_free(scratch, sum(plan.files.values()), f"one back-test model in {scratch}")
                folder.mkdir()
                plan.write(folder, ALONE)
                fingerprint = model_fingerprint(folder)
                score = cache.get(fingerprint)
                if score is None:
                    score = run_eval(command, folder, label)
                    cache.put(fingerprint, score)
                    evaluated += 1
                else:
                    cached += 1
                shutil.rmtree(folder)
                scores.append(score)
                bar.update(task, advance=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return scores, evaluated, cached


def recommend(spreads: list[Spread]) -> tuple[tuple[str, float] | None, str]:
    """The recommended (method, α) and one line saying why, or None: do not jump.

    The rule: among the (method, α) worth at least :data:`MIN_WORTH` of the steps they claim **from
    every origin** (their minimum, so one lucky origin cannot carry a jump), the one worth the most
    real steps on average (ties: the higher mean worth). With one origin this is the plain rule.
    """
    if not spreads:
        return None, "no method could jump from the origin"
    best = max(spreads, key=lambda s: s.worth_mean)
    paying = [s for s in spreads if s.worth_min >= MIN_WORTH]
    origins = max(s.origins for s in spreads)
    where = "" if origins == 1 else f" from every one of {origins} origins"
    if not paying:
        spread = "" if best.origins == 1 else f" ± {best.worth_sd:.2f}, at worst {best.worth_min:.2f}"
        return None, (
            f"no jump was worth half the steps it claimed{where}: the best, {best.method} at "
            f"α={best.alpha:g}, was worth {best.worth_mean:.2f}{spread} "
            f"({best.steps_worth_mean:.0f} of {best.claimed_steps:.0f} steps)"
        )
    chosen = max(paying, key=lambda s: (s.steps_worth_mean, s.worth_mean))
    bound = "at least " if chosen.lower_bound else ""
    spread = "" if chosen.origins == 1 else f" ± {chosen.worth_sd:.2f} over {chosen.origins} origins"
    return (chosen.method, chosen.alpha), (
        f"{chosen.method} at α={chosen.alpha:g} was worth {bound}{chosen.steps_worth_mean:.0f} real steps "
        f"of the {chosen.claimed_steps:.0f} it claimed (worth {bound}{chosen.worth_mean:.2f}{spread})"
    )
