"""The saved predictor: ``<workdir>/predictor.safetensors`` and ``<workdir>/predictor.json``.

``fit`` writes both; the ``next`` method and ``extrapolate`` read them. ``predictor.json`` records the
fingerprint of the store the networks were trained on and the sha256 of the weights file, so a
predictor of another store, or a half-written one, is refused rather than silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from nexttools.errors import UserError
from nexttools.predictor import Architecture, SigmaScale, TrainedPredictor, TrajectoryNet
from nexttools.store import TrajectoryStore
from nexttools.trajectory import Trajectory

PREDICTOR_FORMAT = "nexttools.predictor"
PREDICTOR_VERSION = 1
WEIGHTS_FILE = "predictor.safetensors"
CONFIG_FILE = "predictor.json"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_config(workdir: Path) -> dict | None:
    """The saved predictor.json, None when there is none; ``UserError`` when it is unreadable."""
    path = workdir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(
            f"{path} is not a readable predictor config ({error}); run `nexttools fit --force`"
        ) from None
    if not isinstance(config, dict) or config.get("format") != PREDICTOR_FORMAT:
        raise UserError(f"{path} is not a nexttools predictor config; run `nexttools fit --force`")
    return config


def save_predictor(workdir: Path, predictor: TrainedPredictor, config: dict) -> tuple[Path, Path]:
    """Write ``predictor.safetensors`` then ``predictor.json`` (which records the weights' sha256).

    Both are written in full beside their targets, then ``os.replace``d; a failure before that leaves
    the previous predictor and no partial file, and a crash between the two renames leaves a JSON
    whose hash does not match, which :func:`load_predictor` refuses: never a whole-looking mix.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    weights, config_path = workdir / WEIGHTS_FILE, workdir / CONFIG_FILE
    tensors = {
        f"{key}.{name}": value.detach().cpu().contiguous()
        for key, net in predictor.nets.items()
        for name, value in net.state_dict().items()
    }
    partial = weights.with_name(weights.name + ".partial")
    partial_config = config_path.with_name(config_path.name + ".partial")
    try:
        # Written through open() rather than save_file, which leaves a 0600 file behind; the predictor
        # is small (kilobytes to a few MB), so serialising it in memory costs nothing.
        partial.write_bytes(save(tensors, metadata={"format": "pt"}))
        document = {**config, "weights_sha256": _file_sha256(partial)}
        partial_config.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(partial, weights)
        os.replace(partial_config, config_path)
    except BaseException:  # a full disk, Ctrl-C...: the previous predictor stays, no partial file is left
        partial.unlink(missing_ok=True)
        partial_config.unlink(missing_ok=True)
        raise
    predictor.config = document
    return weights, config_path


def load_predictor(workdir: Path, store: TrajectoryStore | Trajectory) -> TrainedPredictor:
    """The predictor saved in ``workdir``, checked against ``store``'s fingerprint (``UserError`` if
    missing, incomplete, or trained on another store)."""
    workdir = Path(workdir)
    config = read_config(workdir)
    weights = workdir / WEIGHTS_FILE
    if config is None or not weights.is_file():
        raise UserError(f"no predictor in {workdir}: run `nexttools fit` first")
    if config.get("version") != PREDICTOR_VERSION:
        raise UserError(f"{workdir / CONFIG_FILE} has predictor version {config.get('version')!r}; refit")
    fingerprint = store.fingerprint()
    if config["store_fingerprint"] != fingerprint:
        raise UserError(
            f"the predictor in {workdir} was trained on another store (fingerprint "
            f"{config['store_fingerprint']}, this store {fingerprint}): run `nexttools fit` again"
        )
    if config.get("weights_sha256") != _file_sha256(weights):
        raise UserError(
            f"the predictor in {workdir} is incomplete (interrupted fit?): run `nexttools fit` again"
        )
    architecture = Architecture(**config["architecture"])
    tensors = load_file(weights)
    nets: dict[str, TrajectoryNet] = {}
    for key, dim in config["nets"].items():
        net = TrajectoryNet(int(dim), architecture)
        prefix = f"{key}."
        net.load_state_dict(
            {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        )
        nets[key] = net.eval()
    scale = SigmaScale.from_json(config["sigma_scale"])
    return TrainedPredictor(nets=nets, sigma_scale=scale, architecture=architecture, config=config)


def recorded_backtest(workdir: Path, store: TrajectoryStore) -> dict[str, Any] | None:
    """The back-test ``fit`` recorded for ``store`` (None when there is none, or it is another store's)."""
    try:
        config = json.loads((Path(workdir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("store_fingerprint") != store.fingerprint():
        return None
    backtest = config.get("backtest")
    return backtest if isinstance(backtest, dict) else None
