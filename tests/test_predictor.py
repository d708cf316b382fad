"""The predictor networks, their inputs (masking, scaling) and ``TrainedPredictor.predict``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nexttools.predictor import (
    Architecture,
    SigmaScale,
    TrainedPredictor,
    build_net,
    train_nets,
    training_batches,
)
from nexttools.predictor.network import FINAL_LR_FRACTION, WEIGHT_DECAY, TrajectoryNet
from nexttools.threads import single_threaded_kernels
from tests.test_methods import curved_deltas, linear_deltas, module_names, trajectory_from_deltas

STEPS_FROM_ZERO = tuple(range(0, 151, 10))  # a fresh adapter saved at step 0: a zero first row


def test_networks_have_the_papers_shape_and_a_reproducible_initialisation() -> None:
    architecture = Architecture(width=16, depth=2)
    net = build_net("u40", 40, architecture, seed=3)
    torch.manual_seed(123)  # the caller's RNG state must not matter
    again = build_net("u40", 40, architecture, seed=3)
    for (name, a), b in zip(net.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other_seed, other_key = (
        build_net("u40", 40, architecture, seed=4),
        build_net("v40", 40, architecture, seed=3),
    )
    assert not torch.equal(net.encode_global[0].weight, other_seed.encode_global[0].weight)
    assert not torch.equal(net.encode_global[0].weight, other_key.encode_global[0].weight)
    # E_G and E_L: Linear(40,16) GELU Linear(16,16) GELU; D: Linear(32,16) GELU Linear(16,40)
    assert [type(m).__name__ for m in net.encode_local] == ["Linear", "GELU", "Linear", "GELU"]
    assert [type(m).__name__ for m in net.decode] == ["Linear", "GELU", "Linear"]
    assert net.decode[0].in_features == 32 and net.decode[-1].out_features == 40
    assert net(torch.randn(5, 40), torch.randn(5, 40)).shape == (5, 40)
    assert torch.equal(net.skip.detach(), torch.zeros(2))


def test_sigma_features_are_standardised_ratios_and_decode_back() -> None:
    sigma_global = torch.tensor([1e-3, 0.05, 2.0, 10.0], dtype=torch.float64)
    sigma_local = torch.tensor([1e-4, 0.0, 0.5, 1.0], dtype=torch.float64)  # a repeated checkpoint: σ^L = 0
    sigma_target = 3 * sigma_local + 1e-5
    scale = SigmaScale.fit(sigma_global, sigma_local, sigma_target)
    g, l_ = scale.inputs(sigma_global, sigma_local)
    assert g.shape == l_.shape == (4, 1) and torch.isfinite(l_).all()
    for x in (g, l_, scale.encode_target(sigma_global, sigma_target)):
        assert x.mean().abs() < 1e-6 and x.std(unbiased=False) == pytest.approx(1.0, abs=1e-5)
    decoded = scale.decode(sigma_global, scale.encode_target(sigma_global, sigma_target))
    torch.testing.assert_close(decoded, sigma_target, rtol=1e-6, atol=0)
    assert SigmaScale.from_json(json.loads(json.dumps(scale.to_json()))) == scale


def test_training_samples_skip_zero_deltas_and_untouched_modules() -> None:
    deltas = linear_deltas(steps=STEPS_FROM_ZERO)
    for sequence in deltas:
        sequence[0] = np.zeros_like(sequence[0])  # fresh adapter at step 0: B = 0
    deltas[1] = [np.zeros_like(d) for d in deltas[1]]  # k_proj never trained
    trajectory = trajectory_from_deltas(module_names(1), deltas, STEPS_FROM_ZERO, 5)
    rows = np.arange(trajectory.target_rows)  # 11 rows; row 0 has σ^G = 0
    batches, scale = training_batches(trajectory, rows)
    live_rows = len(rows) - 1
    # out: q 32, k 8 (untouched), v 8, o 24, gate/up 40, down 24; in: o 32, down 40, the others 24
    expected = {"u32": 1, "u8": 1, "u24": 2, "u40": 2, "v24": 4, "v32": 1, "v40": 1, "sigma": 6}
    assert {key: b.target.shape[0] for key, b in batches.items()} == {
        key: count * live_rows for key, count in expected.items()
    }
    for key, batch in batches.items():
        dim = batch.target.shape[1]
        if key != "sigma":  # unit vectors scaled by √dim: every row has norm √dim
            for tensor in (batch.global_, batch.local, batch.target):
                torch.testing.assert_close(tensor.norm(dim=1), torch.full((tensor.shape[0],), math.sqrt(dim)))
    assert all(torch.isfinite(t).all() for t in (batches["sigma"].global_, batches["sigma"].local))
    assert scale.target.std > 0


def test_networks_trained_in_parallel_equal_one_optimiser_over_all_of_them() -> None:
    """train_nets trains each network alone, on worker threads; that is one AdamW over the sum of the
    losses (Adam's steps are per parameter), whatever the number of threads."""
    deltas = curved_deltas()
    trajectory = trajectory_from_deltas(module_names(1), deltas, tuple(range(10, 151, 10)), 5)
    batches, _ = training_batches(trajectory, np.arange(trajectory.target_rows))
    architecture = Architecture(width=16, depth=2)

    def fresh() -> dict[str, TrajectoryNet]:
        return {key: build_net(key, b.target.shape[1], architecture, seed=0) for key, b in batches.items()}

    def trained(threads: int) -> dict[str, TrajectoryNet]:
        nets, before = fresh(), torch.get_num_threads()
        torch.set_num_threads(threads)  # cpu_workers: this many worker threads
        try:
            train_nets(nets, batches, epochs=30, lr=3e-3, device=torch.device("cpu"))
        finally:
            torch.set_num_threads(before)
        return nets

    parallel, alone, joint = trained(3), trained(1), fresh()
    assert len(parallel) > 2
    params = [p for net in joint.values() for p in net.parameters()]
    optimiser = torch.optim.AdamW(params, lr=3e-3, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, 30, eta_min=FINAL_LR_FRACTION * 3e-3)
    with single_threaded_kernels():
        for _ in range(30):
            optimiser.zero_grad()
            l1 = torch.nn.functional.l1_loss
            losses = [l1(joint[k](b.global_, b.local), b.target) for k, b in batches.items()]
            torch.stack(losses).sum().backward()
            optimiser.step()
            schedule.step()
    for key in batches:
        for mine, reference in zip(parallel[key].parameters(), joint[key].parameters(), strict=True):
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    for key in batches:  # one worker thread or several: the same bits
        for mine, reference in zip(alone[key].parameters(), parallel[key].parameters(), strict=True):
            assert torch.equal(mine, reference)


def test_training_lowers_the_l1_loss_and_predict_gives_unit_vectors() -> None:
    deltas = curved_deltas()
    deltas[2] = [np.zeros_like(d) for d in deltas[2]]  # v_proj never trained
    trajectory = trajectory_from_deltas(module_names(1), deltas, tuple(range(10, 151, 10)), 5)
    batches, scale = training_batches(trajectory, np.arange(trajectory.target_rows))
    architecture = Architecture(width=16, depth=2)
    nets = {key: build_net(key, b.target.shape[1], architecture, seed=0) for key, b in batches.items()}
    with torch.no_grad():
        before = {
            k: float(torch.nn.functional.l1_loss(nets[k](b.global_, b.local), b.target))
            for k, b in batches.items()
        }
    after = train_nets(nets, batches, epochs=60, lr=3e-3, device=torch.device("cpu"))
    for key in batches:
        assert after[key] < 0.5 * before[key], key

    predicted = TrainedPredictor(nets=nets, sigma_scale=scale, architecture=architecture).predict(trajectory)
    assert predicted.sigma.shape == (7,) and predicted.sigma.dtype == np.float32
    assert predicted.u.shape == (int(trajectory.u_offset[-1]),) and predicted.v.shape == (
        int(trajectory.v_offset[-1]),
    )
    for j in range(7):
        u = predicted.u[trajectory.u_offset[j] : trajectory.u_offset[j + 1]]
        v = predicted.v[trajectory.v_offset[j] : trajectory.v_offset[j + 1]]
        if j == 2:
            assert predicted.sigma[j] == 0 and not u.any() and not v.any()
        else:
            assert predicted.sigma[j] > 0
            assert np.linalg.norm(u) == pytest.approx(1.0, abs=1e-6)
            assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-6)
