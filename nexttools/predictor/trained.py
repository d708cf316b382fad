"""A trained predictor: its networks, and the prediction of every module's next rank-1 update."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nexttools.errors import UserError
from nexttools.predictor.network import Architecture, SigmaScale, TrajectoryNet, net_key
from nexttools.predictor.samples import _columns, _sigma_inputs, _unit_inputs
from nexttools.store import DeltaArrays, TrajectoryStore
from nexttools.store.trajectory import Trajectory, as_trajectory


@dataclass
class TrainedPredictor:
    """Trained networks (keys from :func:`~nexttools.predictor.net_key`) and their σ scaling."""

    nets: dict[str, TrajectoryNet]
    sigma_scale: SigmaScale
    architecture: Architecture

    def predict(self, source: TrajectoryStore | Trajectory, row: int = -1) -> DeltaArrays:
        """Predicted target rank-1 of every module at store row ``row`` (the last by default).

        Returns σ̂ ``(M,)`` (> 0: the σ network predicts log σ), û ``(Σout,)`` and v̂ ``(Σin,)``
        renormalised to unit length per module, float32. Modules whose global delta at ``row`` is
        zero get σ̂ = 0 and û = v̂ = 0.
        """
        trajectory = as_trajectory(source)
        r = trajectory.row_index(row)
        live = np.flatnonzero(trajectory.global_.sigma[r] > 0)
        return self.predict_pairs(trajectory, np.full(len(live), r), live)

    def predict_pairs(self, trajectory: Trajectory, rows: np.ndarray, modules: np.ndarray) -> DeltaArrays:
        """Predictions for the (row, module) pairs ``zip(rows, modules)`` (all with σ^G > 0), scattered
        into 1-D arrays over all modules (a module appears at most once)."""
        device = next(iter(self.nets.values())).skip.device
        count = len(trajectory.modules)
        out = DeltaArrays(
            sigma=np.zeros(count, dtype=np.float32),
            u=np.zeros(int(trajectory.u_offset[-1]), dtype=np.float32),
            v=np.zeros(int(trajectory.v_offset[-1]), dtype=np.float32),
        )
        if len(modules) == 0:
            return out
        with torch.no_grad():
            for part, offset, target in (
                ("u", trajectory.u_offset, out.u),
                ("v", trajectory.v_offset, out.v),
            ):
                dims = np.diff(offset)
                for dim in np.unique(dims[modules]):
                    chosen = dims[modules] == dim
                    net = self._net(net_key(part, int(dim)), trajectory, modules[chosen])
                    g, l_ = _unit_inputs(trajectory, part, rows[chosen], modules[chosen], int(dim))
                    pred = net(g.to(device), l_.to(device)).double().cpu()
                    pred = pred / pred.norm(dim=1, keepdim=True).clamp_min(1e-30)
                    columns = _columns(offset, modules[chosen], int(dim))
                    target[columns.reshape(-1)] = pred.float().numpy().reshape(-1)
            sg, sl = _sigma_inputs(trajectory, rows, modules)
            net = self._net("sigma", trajectory, modules)
            g, l_ = self.sigma_scale.inputs(sg, sl)
            out.sigma[modules] = self.sigma_scale.decode(sg, net(g.to(device), l_.to(device))).float().numpy()
        return out

    def _net(self, key: str, trajectory: Trajectory, modules: np.ndarray) -> TrajectoryNet:
        if key not in self.nets:
            name = trajectory.modules[int(modules[0])]
            raise UserError(f"the predictor has no {key} network for {name}: it never saw it trained; refit")
        return self.nets[key]
