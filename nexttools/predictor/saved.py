"""The saved predictor: ``<workdir>/predictor.safetensors`` and ``<workdir>/predictor.json``.

``fit`` writes both; the ``next`` method and ``extrapolate`` read them. ``predictor.json`` records the
fingerprint of the store the networks were trained on and the sha256 of the weights file, so a
predictor of another store, or a half-written one, is refused rather than silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from nexttools.errors import UserError
from nexttools.predictor.network import Architecture, SigmaScale, TrajectoryNet
from nexttools.predictor.trained import TrainedPredictor
from nexttools.safe_files import stage_file
from nexttools.store import TrajectoryStore
from nexttools.store.trajectory import Trajectory
from nexttools.workdir import Workdir

PREDICTOR_FORMAT = "nexttools.predictor"
PREDICTOR_VERSION = 1


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TrainingRecord:
    """How the saved networks were trained: the settings, the ``holdout`` rows kept for the
    back-test, whether they were ``refit`` on every row after it, and the target ``rows`` and run
    ``steps`` (first, last) they were trained on."""

    epochs: int
    lr: float
    seed: int
    device: str
    holdout: int
    refit: bool
    rows: tuple[int, int]
    steps: tuple[int, int]


@dataclass(frozen=True)
class PredictorConfig:
    """``predictor.json``: what the saved networks are and what they were trained on.

    ``nets`` maps each network key (:func:`~nexttools.predictor.net_key`) to its vector length;
    ``store_fingerprint`` ties them to one store (any other is refused); ``weights_sha256`` to one
    weights file (a half-written pair is refused). ``backtest`` is ``fit``'s back-test document
    (:meth:`nexttools.fit.BacktestResult.document`), ``verdict`` the ``nexttools backtest`` verdict
    recorded when ``fit`` ran (:mod:`nexttools.verdict`), each as written.
    """

    path: str
    store: str
    store_fingerprint: str
    k: int
    architecture: Architecture
    nets: dict[str, int]
    sigma_scale: SigmaScale
    training: TrainingRecord
    train_loss: float
    losses: dict[str, float]
    backtest: dict[str, Any]
    verdict: dict[str, Any] | None
    versions: dict[str, str]
    unit_vector_scale: str = "sqrt(dim)"
    weights_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON document (the one writer is :func:`save_predictor`)."""
        document = asdict(self)
        document["sigma_scale"] = self.sigma_scale.to_json()
        document["training"]["rows"] = list(self.training.rows)
        document["training"]["steps"] = list(self.training.steps)
        return {"format": PREDICTOR_FORMAT, "version": PREDICTOR_VERSION, **document}

    @staticmethod
    def from_json(document: object, path: Path) -> PredictorConfig:
        """The config in ``document`` (read from ``path``); ``UserError`` when it is not one."""
        refit = "; run `nexttools fit --force`"
        if not isinstance(document, dict) or document.get("format") != PREDICTOR_FORMAT:
            raise UserError(f"{path} is not a nexttools predictor config{refit}")
        if document.get("version") != PREDICTOR_VERSION:
            raise UserError(f"{path} has predictor version {document.get('version')!r}{refit}")
        try:
            training = dict(document["training"])
            return PredictorConfig(
                path=str(document["path"]),
                store=str(document["store"]),
                store_fingerprint=str(document["store_fingerprint"]),
                k=int(document["k"]),
                architecture=Architecture(**document["architecture"]),
                nets={str(key): int(dim) for key, dim in document["nets"].items()},
                sigma_scale=SigmaScale.from_json(document["sigma_scale"]),
                training=TrainingRecord(
                    **{**training, "rows": tuple(training["rows"]), "steps": tuple(training["steps"])}
                ),
                train_loss=float(document["train_loss"]),
                losses={str(key): float(value) for key, value in document["losses"].items()},
                backtest=dict(document["backtest"]),
                verdict=document.get("verdict"),
                versions=dict(document.get("versions", {})),
                unit_vector_scale=str(document.get("unit_vector_scale", "sqrt(dim)")),
                weights_sha256=str(document.get("weights_sha256", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UserError(f"{path} is not a complete predictor config ({error!r}){refit}") from None

    def manifest_entry(self) -> dict[str, Any]:
        """What an output's manifest records: files, store fingerprint, training loss, back-test."""
        methods = self.backtest.get("methods", {})
        return {
            "path": self.path,
            "store_fingerprint": self.store_fingerprint,
            "train_loss": self.train_loss,
            "backtest": {
                "winner": self.backtest.get("winner"),
                "summary": self.backtest.get("summary"),
                "overall_cosine": {
                    name: None if score is None else score["cosine"]["overall"]
                    for name, score in methods.items()
                },
            },
        }


def read_config(workdir: Path) -> PredictorConfig | None:
    """The saved ``predictor.json``, None when there is none; ``UserError`` when it is unreadable."""
    path = Workdir(workdir).predictor_config
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(
            f"{path} is not a readable predictor config ({error}); run `nexttools fit --force`"
        ) from None
    return PredictorConfig.from_json(document, path)


def save_predictor(workdir: Path, predictor: TrainedPredictor, config: PredictorConfig) -> tuple[Path, Path]:
    """Write ``predictor.safetensors`` then ``predictor.json`` (which records the weights' sha256).

    Both are written in full beside their targets, then ``os.replace``d; a failure before that leaves
    the previous predictor and no partial file, and a crash between the two renames leaves a JSON
    whose hash does not match, which :func:`load_predictor` refuses: never a whole-looking mix.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    weights, config_path = Workdir(workdir).predictor_weights, Workdir(workdir).predictor_config
    tensors = {
        f"{key}.{name}": value.detach().cpu().contiguous()
        for key, net in predictor.nets.items()
        for name, value in net.state_dict().items()
    }
    staged: list[Path] = []
    try:
        # Serialised in memory (the predictor is kilobytes to a few MB) and staged under fresh names.
        staged.append(stage_file(weights, save(tensors, metadata={"format": "pt"})))
        document = replace(config, weights_sha256=_file_sha256(staged[0])).to_json()
        staged.append(stage_file(config_path, (json.dumps(document, indent=2) + "\n").encode()))
        os.replace(staged[0], weights)
        os.replace(staged[1], config_path)
    except BaseException:  # a full disk, Ctrl-C...: the previous predictor stays, no partial file is left
        for path in staged:
            path.unlink(missing_ok=True)
        raise
    return weights, config_path


def load_predictor(
    workdir: Path, store: TrajectoryStore | Trajectory, config: PredictorConfig | None = None
) -> TrainedPredictor:
    """The predictor saved in ``workdir``, checked against ``store``'s fingerprint (``UserError`` if
    missing, incomplete, or trained on another store). ``config``: its ``predictor.json``, when the
    caller has read it already (:class:`nexttools.records.StoreRecords`)."""
    workdir = Path(workdir)
    config = config or read_config(workdir)
    weights = Workdir(workdir).predictor_weights
    if config is None or not weights.is_file():
        raise UserError(f"no predictor in {workdir}: run `nexttools fit` first")
    fingerprint = store.fingerprint()
    if config.store_fingerprint != fingerprint:
        raise UserError(
            f"the predictor in {workdir} was trained on another store (fingerprint "
            f"{config.store_fingerprint}, this store {fingerprint}): run `nexttools fit` again"
        )
    if config.weights_sha256 != _file_sha256(weights):
        raise UserError(
            f"the predictor in {workdir} is incomplete (interrupted fit?): run `nexttools fit` again"
        )
    tensors = load_file(weights)
    nets: dict[str, TrajectoryNet] = {}
    for key, dim in config.nets.items():
        net = TrajectoryNet(dim, config.architecture)
        prefix = f"{key}."
        net.load_state_dict(
            {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        )
        nets[key] = net.eval()
    return TrainedPredictor(nets=nets, sigma_scale=config.sigma_scale, architecture=config.architecture)


def recorded_backtest(workdir: Path, store: TrajectoryStore) -> dict[str, Any] | None:
    """The back-test ``fit`` recorded for ``store`` (None when there is none, it is unreadable, or it
    is another store's: an output or ``inspect`` then simply shows no back-test)."""
    try:
        config = read_config(Path(workdir))
    except UserError:
        return None
    if config is None or config.store_fingerprint != store.fingerprint():
        return None
    return config.backtest
