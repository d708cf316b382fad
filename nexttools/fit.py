"""``nexttools fit``: train the NExt predictor on a trajectory store, back-test it, save it.

Flow: read the store (all three delta kinds), refuse what cannot be fitted, hold out the last
``holdout`` target rows, train on the rest and back-test every registered method
(:data:`nexttools.methods.METHODS`) on the held-out rows, then train again on every target row
(unless ``refit=False``) and save the predictor as ``<workdir>/predictor.safetensors`` +
``<workdir>/predictor.json`` (with the back-test, and ``nexttools backtest``'s verdict if any).

Training samples are the (module, row) pairs with a non-zero global delta and a non-zero target
(zero deltas, untouched modules and the NaN target tail never enter training).

**Back-test figures, headline: the full-space skill** (:mod:`nexttools.skill`): every method jumps
from each held-out checkpoint as it is applied and is scored against the whole true change, S at
``alpha`` and α*, from the run's files; the winner has the highest overall S. When the run's files
cannot be opened, the store's rank-1 figures decide instead (with a warning).

**Rank-1 figures** (the store alone). For a held-out row r and a module j whose true target has
σ > 0, the cosine between predicted and true target deltas as matrices is ⟨σ̂ûv̂ᵀ, σuvᵀ⟩_F /
(‖·‖‖·‖) = (û·u)(v̂·v) (signs included; 0 when a method predicts nothing), and the σ error is
|σ̂ − σ| / σ. Per module kind and overall, both are means over the (module, row) pairs weighted by
the true σ: a module whose target barely moves must not count as much as one that moves a lot,
and the weighted σ error is Σ|σ̂ − σ| / Σσ, the relative error of the total movement. They did not
predict a jump's worth (README, "Back-test"), which is why S leads.

The default architecture and training settings, and the back-test figures that chose them, are in
`docs/predictor.md`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nexttools import __version__
from nexttools.console import warn
from nexttools.device import resolve_device
from nexttools.errors import UserError
from nexttools.methods import METHODS
from nexttools.options import CheckedOptions, device_option, option, store_option, workdir_option
from nexttools.predictor import (
    DEFAULT_DEPTH,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_WIDTH,
    Architecture,
    TrainedPredictor,
    train_predictor,
)
from nexttools.predictor.saved import (
    PredictorConfig,
    TrainingRecord,
    read_config,
    save_predictor,
)
from nexttools.run import OpenedRun
from nexttools.skill import SkillScore, full_space_backtest
from nexttools.store import DeltaArrays, TrajectoryStore, open_store
from nexttools.store.trajectory import Trajectory, module_kind
from nexttools.verdict import read_verdict
from nexttools.workdir import Workdir


@dataclass(frozen=True)
class FitOptions(CheckedOptions):
    """Inputs of :func:`fit`. ``store`` defaults to ``<workdir>/trajectory.h5``; ``holdout`` to
    :func:`default_holdout`; ``device`` is ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:n]"``."""

    workdir: Path = workdir_option()
    store: Path | None = store_option()
    epochs: int = option(DEFAULT_EPOCHS, "Full-batch training steps.", kind="count")
    lr: float = option(DEFAULT_LR, "AdamW learning rate.", kind="positive")
    width: int = option(DEFAULT_WIDTH, "Hidden units per layer.", kind="count")
    depth: int = option(DEFAULT_DEPTH, "Layers per encoder/decoder.", kind="count")
    seed: int = option(0, "Seed of the initialisation (same seed, same predictor on CPU).", kind="seed")
    device: str = device_option()
    holdout: int | None = option(
        None, "Target rows held out for the back-test [default: a third of them, at least 1].", kind="count"
    )
    refit: bool = option(True, "Retrain on every target row after the back-test.", kind="toggle")
    force: bool = option(
        False,
        "Replace a predictor trained on another store file (refitting the same, grown store needs none).",
    )
    alpha: float = option(
        1.0,
        "α at which the full-space skill S of every method is scored (α* is reported beside it).",
        kind="alpha",
    )


@dataclass(frozen=True)
class MethodScore:
    """Back-test figures of one method: σ-weighted means per module kind and ``"overall"``."""

    cosine: dict[str, float]
    sigma_rel_err: dict[str, float]


@dataclass(frozen=True)
class Backtest:
    """Held-out rows, figures per method (None: the method cannot predict those rows) and the winner.

    ``skill`` is the full-space back-test (:mod:`nexttools.skill`), the headline when the run's
    files could be read (``skill_skipped`` says why not otherwise); ``methods`` holds the rank-1
    figures the store alone gives.
    """

    holdout_rows: int
    train_rows: int
    methods: dict[str, MethodScore | None]
    skill: dict[str, SkillScore | None] | None
    skill_notes: dict[str, str]
    skill_skipped: str | None
    winner: str
    summary: str

    def document(self) -> dict:
        """The ``"backtest"`` part of ``fit --json``."""
        return {
            "holdout_rows": self.holdout_rows,
            "train_rows": self.train_rows,
            "skill": None
            if self.skill is None
            else {name: None if s is None else asdict(s) for name, s in self.skill.items()},
            "skill_notes": self.skill_notes,
            "skill_skipped": self.skill_skipped,
            "methods": {name: None if s is None else asdict(s) for name, s in self.methods.items()},
            "winner": self.winner,
            "summary": self.summary,
        }


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` did: the back-test, the saved files and the final training loss."""

    backtest: Backtest
    weights_path: Path
    config_path: Path
    train_loss: float
    refit: bool
    store_fingerprint: str

    def document(self) -> dict:
        """The ``fit --json`` document."""
        return {
            "backtest": self.backtest.document(),
            "predictor": {
                "path": str(self.weights_path),
                "config": str(self.config_path),
                "train_loss": self.train_loss,
                "refit": self.refit,
                "store_fingerprint": self.store_fingerprint,
            },
        }


def default_holdout(target_rows: int) -> int:
    """A third of the target rows, at least 1 (``target_rows`` ≥ 2)."""
    return max(1, target_rows // 3)


def check_trajectory(trajectory: Trajectory, holdout: int) -> None:
    """Refuse a trajectory that cannot be fitted and back-tested with ``holdout`` rows (``UserError``)."""
    k, count = trajectory.k, trajectory.checkpoints
    if count < k + 2:
        raise UserError(
            f"the store has {count} checkpoints; fit needs at least k+2 = {k + 2} (k={k}: one target "
            "row to train on and one to hold out): extract more checkpoints"
        )
    last = trajectory.target_rows
    for kind, arrays, rows in (
        ("global", trajectory.global_, slice(None)),
        ("local", trajectory.local, slice(None)),
        ("target", trajectory.target, slice(0, last)),
    ):
        for name in ("sigma", "u", "v"):
            if not np.isfinite(getattr(arrays, name)[rows]).all():
                raise UserError(f"the store has NaN/Inf in {kind}/{name}: re-run `nexttools extract`")
    if holdout < 1 or holdout >= last:
        raise UserError(
            f"--holdout {holdout} leaves nothing to train on: the store has {last} target rows "
            f"(use 1..{last - 1})"
        )


def score(trajectory: Trajectory, predictions: dict[int, DeltaArrays]) -> MethodScore:
    """Back-test figures of one method from its 1-D predictions of the held-out target rows."""
    kinds = np.array([module_kind(name) for name in trajectory.modules])
    weights, cosines, errors, pair_kinds = [], [], [], []
    for r, pred in predictions.items():
        true = trajectory.target
        sigma = true.sigma[r].astype(np.float64)
        dot_u = _segment_dots(pred.u, true.u[r], trajectory.u_offset)
        dot_v = _segment_dots(pred.v, true.v[r], trajectory.v_offset)
        live = sigma > 0
        weights.append(sigma[live])
        cosines.append((dot_u * dot_v)[live])
        errors.append(np.abs(pred.sigma[live].astype(np.float64) - sigma[live]) / sigma[live])
        pair_kinds.append(kinds[live])
    w, c, e, k = (np.concatenate(x) for x in (weights, cosines, errors, pair_kinds))
    cosine, error = {"overall": _weighted(c, w)}, {"overall": _weighted(e, w)}
    for kind in dict.fromkeys(kinds.tolist()):
        chosen = k == kind
        if chosen.any():
            cosine[kind], error[kind] = _weighted(c[chosen], w[chosen]), _weighted(e[chosen], w[chosen])
    return MethodScore(cosine=cosine, sigma_rel_err=error)


def _segment_dots(a: np.ndarray, b: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Per-module dot products of two concatenated vectors: ``(Σdim,), (Σdim,) -> (M,)`` float64."""
    return np.add.reduceat(a.astype(np.float64) * b.astype(np.float64), offset[:-1])


def _weighted(values: np.ndarray, weights: np.ndarray) -> float:
    return (
        float(np.sum(values * weights) / np.sum(weights)) if weights.size and weights.sum() > 0 else math.nan
    )


def backtest(
    trajectory: Trajectory,
    holdout: int,
    *,
    store: TrajectoryStore | None,
    alpha: float,
    architecture: Architecture,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> tuple[Backtest, TrainedPredictor, dict[str, float]]:
    """Train on all target rows but the last ``holdout``, then score every method on those: in full
    space from the files of ``store``'s run (skipped, with the reason, when ``store`` is None or a
    file is missing or changed) and by the store's rank-1 figures.

    Returns the figures, and the predictor trained for them with its final losses."""
    last = trajectory.target_rows
    train_rows, held = np.arange(last - holdout), np.arange(last - holdout, last)
    predictor, losses = train_predictor(
        trajectory,
        train_rows,
        architecture=architecture,
        epochs=epochs,
        lr=lr,
        seed=seed,
        device=device,
        label="back-test",
    )
    methods: dict[str, MethodScore | None] = {}
    for name, method in METHODS.items():
        predictions = method.backtest(trajectory, held, predictor)
        methods[name] = None if predictions is None else score(trajectory, predictions)
    skill: dict[str, SkillScore | None] | None = None
    notes: dict[str, str] = {}
    skipped = None if store is not None else "no store to open the run from"
    if store is not None:
        try:
            run = OpenedRun(store, trajectory)
            skill, notes = full_space_backtest(run, [int(r) for r in held], predictor, alpha)
        except UserError as error:
            skipped = str(error)
    if skipped is not None:
        warn(f"the full-space back-test was skipped ({skipped}); showing the store's rank-1 figures")
    winner, summary = _verdict(methods) if skill is None else _skill_verdict(skill, notes, alpha)
    result = Backtest(holdout, len(train_rows), methods, skill, notes, skipped, winner, summary)
    return result, predictor, losses


def _skill_verdict(
    skill: dict[str, SkillScore | None], notes: dict[str, str], alpha: float
) -> tuple[str, str]:
    """The method with the highest overall skill S at ``alpha``, and one sentence saying so."""
    scored = {name: s for name, s in skill.items() if s is not None and not math.isnan(s.skill["overall"])}
    if not scored:
        return "none", "No held-out change moved: nothing to compare."
    winner = max(scored, key=lambda name: scored[name].skill["overall"])
    best = scored[winner]
    others = ", ".join(
        f"{name} {'< −1 (diverges)' if s.skill['overall'] < -1 else format(s.skill['overall'], '.3f')}"
        for name, s in scored.items()
        if name != winner
    )
    missing = "".join(f"; {name} is not scored ({note})" for name, note in notes.items())
    if best.skill["overall"] <= 0:
        lead = (
            f"No method predicts the held-out changes better than not jumping: the best skill at "
            f"α={alpha:g} is {winner}'s {best.skill['overall']:.3f}"
        )
    else:
        lead = (
            f"{winner} predicts the held-out changes best: skill S {best.skill['overall']:.3f} at "
            f"α={alpha:g} (α* {best.alpha_star['overall']:.2f})"
        )
    return (
        winner,
        f"{lead} (parameter space; `nexttools backtest` judges in function space), "
        f"against {others or 'nothing'}{missing}.",
    )


def _verdict(methods: dict[str, MethodScore | None]) -> tuple[str, str]:
    """The method with the highest overall cosine, and one sentence saying so."""
    scored = {name: s for name, s in methods.items() if s is not None and not math.isnan(s.cosine["overall"])}
    if not scored:
        return "none", "No held-out target moved: nothing to compare."
    winner = max(
        scored, key=lambda name: (scored[name].cosine["overall"], -scored[name].sigma_rel_err["overall"])
    )
    others = ", ".join(f"{name} {s.cosine['overall']:.3f}" for name, s in scored.items() if name != winner)
    missing = [name for name, s in methods.items() if s is None]
    note = "".join(f"; {name} is not scored here ({METHODS[name].backtest_note})" for name in missing)
    best = scored[winner]
    return winner, (
        f"{winner} predicts the held-out targets best: overall cosine {best.cosine['overall']:.3f} "
        f"(σ error {best.sigma_rel_err['overall']:.1%}) against {others or 'nothing'}{note}."
    )


def fit(options: FitOptions) -> FitResult:
    """Back-test, refit and save the predictor for the store in ``options`` (see the module docstring)."""
    store_path = Workdir(options.workdir, options.store).store
    device = resolve_device(options.device)
    with open_store(store_path) as store:
        return _fit(options, store, store_path, device)


def _fit(options: FitOptions, store: TrajectoryStore, store_path: Path, device: torch.device) -> FitResult:
    workdir = Path(options.workdir)
    trajectory = Trajectory.from_store(store)
    holdout = (
        options.holdout if options.holdout is not None else default_holdout(max(trajectory.target_rows, 2))
    )
    check_trajectory(trajectory, holdout)
    fingerprint = trajectory.fingerprint()
    # Refitting after `extract` grew the same store is the normal path; a predictor of another store
    # file (another run sharing this workdir) is only replaced on purpose.
    existing = None if options.force else read_config(workdir)
    if existing is not None and Path(existing.store).absolute() != store_path.absolute():
        raise UserError(
            f"{Workdir(workdir).predictor_config} holds a predictor trained on another store "
            f"({existing.store}, not {store_path}); pass --force to replace it"
        )

    architecture = Architecture(width=options.width, depth=options.depth)
    training = {"epochs": options.epochs, "lr": options.lr, "seed": options.seed}
    settings = {"architecture": architecture, "device": device, **training}
    result, predictor, losses = backtest(
        trajectory,
        holdout,
        store=store,
        alpha=options.alpha,
        **settings,  # type: ignore[arg-type]
    )
    rows = np.arange(trajectory.target_rows if options.refit else trajectory.target_rows - holdout)
    if options.refit:
        predictor, losses = train_predictor(trajectory, rows, label="refit", **settings)  # type: ignore[arg-type]
    train_loss = float(np.mean(list(losses.values())))
    config = PredictorConfig(
        path=str(Workdir(workdir).predictor_weights),
        store=str(store_path),
        store_fingerprint=fingerprint,
        k=trajectory.k,
        architecture=architecture,
        nets={key: net.dim for key, net in predictor.nets.items()},
        sigma_scale=predictor.sigma_scale,
        training=TrainingRecord(
            epochs=options.epochs,
            lr=options.lr,
            seed=options.seed,
            device=str(device),
            holdout=holdout,
            refit=options.refit,
            rows=(int(rows[0]), int(rows[-1])),
            steps=(int(trajectory.steps[rows[0]]), int(trajectory.steps[rows[-1]])),
        ),
        train_loss=train_loss,
        losses=losses,
        backtest=result.document(),
        verdict=read_verdict(workdir, store),
        versions={"nexttools": __version__, "torch": torch.__version__},
    )
    weights_path, config_path = save_predictor(workdir, predictor, config)
    return FitResult(result, weights_path, config_path, train_loss, options.refit, fingerprint)
