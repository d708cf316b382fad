"""``extract`` against a from-scratch dense computation, and its incremental behaviour.

The reference merges every checkpoint with PEFT's own ``merge_and_unload``, forms G, L and T
densely in float64 and takes ``torch.linalg.svd``; the store must agree up to the sign convention,
which is checked on its own.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.demo_run import DemoRun
from nexttools.checkpoints.adapter import AdapterCheckpoint
from nexttools.extract import ExtractOptions, ExtractSummary, extract
from nexttools.store import KINDS, TrajectoryStore, open_store, partial_path
from tests.conftest import copy_tree

SIGMA_RTOL = 1e-4  # float32 merged weights minus float32 base: ~1e-6 relative noise on ΔW
ALIGN_TOL = 1e-4


def run_extract(run: Path, store: Path, **options: object) -> ExtractSummary:
    return extract(ExtractOptions(run=run, store=store, device="cpu", **options))  # type: ignore[arg-type]


def select(demo: DemoRun, out: Path, steps: tuple[int, ...]) -> Path:
    """A run folder holding only ``steps`` of ``demo`` (copies, so a test may modify them)."""
    out.mkdir()
    for step in steps:
        copy_tree(demo.run / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return out


# ---------------------------------------------------------------------------------------------
# Dense reference through PEFT.


def merged_deltas(base: Path, checkpoints: list[Path], names: list[str]) -> list[dict[str, torch.Tensor]]:
    """ΔW of each checkpoint (float64), from PEFT ``merge_and_unload`` of the adapter onto the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    deltas = []
    for folder in checkpoints:
        merged = PeftModel.from_pretrained(copy.deepcopy(model), folder).merge_and_unload().state_dict()
        deltas.append({name: merged[name].double() - base_weights[name].double() for name in names})
    return deltas


def dense_triples(
    deltas: list[dict[str, torch.Tensor]], name: str, k: int
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]]:
    """Per kind and row: (singular values, u1, v1) of the dense G, L, T of one module (None: no target)."""
    c = len(deltas)
    zero = torch.zeros_like(deltas[0][name])

    def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return s, u[:, 0], vh[0]

    return {
        "global": [svd(deltas[i][name]) for i in range(c)],
        "local": [svd(deltas[i][name] - (deltas[i - 1][name] if i > 0 else zero)) for i in range(c)],
        "target": [svd(deltas[i + k][name] - deltas[i][name]) if i + k < c else None for i in range(c)],
    }


def assert_matches_dense(store: TrajectoryStore, deltas: list[dict[str, torch.Tensor]]) -> int:
    """Every row equals the dense top triple up to a joint sign; returns how many directions were compared."""
    compared = 0
    for j, name in enumerate(store.modules):
        reference = dense_triples(deltas, name, store.k)
        for kind in KINDS:
            rows = store.read_module(kind, j)
            for i, ref in enumerate(reference[kind]):
                if ref is None:
                    assert np.isnan(rows.sigma[i]) and np.isnan(rows.u[i]).all() and np.isnan(rows.v[i]).all()
                    continue
                s, u_ref, v_ref = ref
                sigma = float(rows.sigma[i])
                assert sigma == pytest.approx(float(s[0]), rel=SIGMA_RTOL, abs=1e-9), (kind, name, i)
                if s[0] == 0:
                    assert not rows.u[i].any() and not rows.v[i].any()
                    continue
                if (s[0] - s[1]) / s[0] < 1e-2:
                    continue  # near-degenerate top pair: the direction is not well defined
                u, v = torch.from_numpy(rows.u[i]).double(), torch.from_numpy(rows.v[i]).double()
                cos_u, cos_v = float(u @ u_ref), float(v @ v_ref)
                assert abs(cos_u) >= 1 - ALIGN_TOL and abs(cos_v) >= 1 - ALIGN_TOL, (kind, name, i)
                assert cos_u * cos_v > 0, "u and v must flip together (σ u vᵀ is the delta)"
                compared += 1
    return compared


def assert_sign_convention(store: TrajectoryStore) -> None:
    """G follows the previous non-zero G, the first one has its largest-|u| entry positive; L, T follow G."""
    for j in range(len(store.modules)):
        g = store.read_module("global", j)
        previous = None
        for i in range(len(store.steps)):
            if g.sigma[i] == 0:
                continue
            if previous is None:
                assert g.u[i][np.argmax(np.abs(g.u[i]))] > 0
            else:
                assert float(g.u[i] @ previous) >= 0
            previous = g.u[i]
            for kind in ("local", "target"):
                other = store.read_module(kind, j)
                if not np.isnan(other.sigma[i]) and other.sigma[i] > 0:
                    assert float(other.u[i] @ g.u[i]) >= 0, (kind, j, i)


def read_all(store_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    with open_store(store_path) as store:
        return {kind: (a.sigma, a.u, a.v) for kind in KINDS for a in [store.read(kind)]}


def assert_stores_close(a: Path, b: Path, *, atol: float = 1e-6) -> None:
    """Every delta kind within ``atol``, and the same Gram band (kept entries are the ones computed)."""
    left, right = read_all(a), read_all(b)
    for kind in KINDS:
        for x, y in zip(left[kind], right[kind], strict=True):
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, equal_nan=True, err_msg=kind)
    with open_store(a) as first, open_store(b) as second:
        np.testing.assert_allclose(first.gram(), second.gram(), rtol=1e-9, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------


def test_store_equals_dense_reference_and_sign_convention(short_run: DemoRun, tmp_path: Path) -> None:
    store_path = tmp_path / "work" / "trajectory.h5"
    summary = run_extract(short_run.run, store_path, k=3)
    assert summary.steps == short_run.steps and summary.checkpoints == 8
    assert summary.rows_computed == {"global": 8, "local": 8, "target": 5}
    assert summary.ranks == (8,) and summary.scaling_rule == "alpha/r" and summary.run_kind == "lora"
    assert summary.modules == 14 and summary.carried == 0  # 2 layers x q,k,v,o,gate,up,down
    assert summary.energy_ratio is not None
    lo, median, hi = summary.energy_ratio
    assert 0 < lo <= median <= hi <= 1

    with open_store(store_path) as store:
        assert store.k == 3 and store.source == str(short_run.run) and store.base_model == str(short_run.base)
        assert store.steps.tolist() == list(short_run.steps)
        assert store.modules[0].startswith("model.layers.0.") and store.modules[0].endswith(".weight")
        assert (store.ranks == 8).all() and store.run_kind == "lora"
        assert summary.store_fingerprint == store.fingerprint()
        deltas = merged_deltas(
            short_run.base, [short_run.run / f"checkpoint-{s}" for s in short_run.steps], store.modules
        )
        compared = assert_matches_dense(store, deltas)
        assert compared >= 0.8 * 14 * (8 + 8 + 5)
        assert_sign_convention(store)

        # The energy ratio is σ1/Σσᵢ of the last global delta (paper §3.2), min/median/max over modules.
        ratios = []
        for name in store.modules:
            s = torch.linalg.svdvals(deltas[-1][name])
            ratios.append(float(s[0] / s.sum()))
        assert summary.energy_ratio == pytest.approx(
            (min(ratios), float(np.median(ratios)), max(ratios)), rel=1e-4
        )


def test_worker_threads_write_the_same_store_byte_for_byte(short_run: DemoRun, tmp_path: Path) -> None:
    """Modules run on one thread per core (nexttools.threads): the store must not depend on how many.

    The suite runs with one torch thread (conftest), which is the one-worker path; here two workers
    compute the modules concurrently, on a LoRA run and on a full-weight run.
    """
    full_run = tmp_path / "full"
    write_full_weight_run(short_run, full_run, (10, 20, 30, 40, 50))
    before = torch.get_num_threads()
    for run, base in ((short_run.run, None), (full_run, str(short_run.base))):
        paths = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                store = tmp_path / f"{run.name}-{threads}" / "trajectory.h5"
                options = ExtractOptions(run=run, base=base, workdir=store.parent, k=3, device="cpu")
                extract(options)
            finally:
                torch.set_num_threads(before)
            paths.append(store)
        assert paths[0].read_bytes() == paths[1].read_bytes(), run


def test_step_zero_checkpoint_is_a_zero_row(short_run: DemoRun, tmp_path: Path) -> None:
    """A fresh adapter saved at step 0 (PEFT init: B = 0) is a row with σ = 0 and u = v = 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = select(short_run, tmp_path / "run", (10, 20, 30))
    config = json.loads((run / "checkpoint-10" / "adapter_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(short_run.base, dtype=torch.float32)
    lora = LoraConfig(
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        target_modules=config["target_modules"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(short_run.base),
    )
    fresh = tmp_path / "run" / "checkpoint-0"
    get_peft_model(model, lora).save_pretrained(fresh)
    (fresh / "trainer_state.json").write_text(json.dumps({"global_step": 0}))

    store_path = tmp_path / "trajectory.h5"
    summary = run_extract(run, store_path, k=2)
    assert summary.steps == (0, 10, 20, 30)
    with open_store(store_path) as store:
        for kind in ("global", "local"):
            rows = store.read(kind)
            assert (rows.sigma[0] == 0).all() and not rows.u[0].any() and not rows.v[0].any()
            assert (rows.sigma[1] > 0).all()
        target = store.read("target")
        assert (target.sigma[:2] > 0).all() and np.isnan(target.sigma[2:]).all()
        # L of the first trained checkpoint is ΔW_1 − 0 = G_1, sign included.
        np.testing.assert_allclose(store.read("local").u[1], store.read("global").u[1], atol=1e-6)
        deltas = merged_deltas(
            short_run.base, [run / f"checkpoint-{s}" for s in (0, 10, 20, 30)], store.modules
        )
        assert assert_matches_dense(store, deltas) > 0
        assert_sign_convention(store)


def test_append_computes_only_new_rows(
    short_run: DemoRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = select(short_run, tmp_path / "run", (10, 20, 30, 40, 50))
    store_path = tmp_path / "trajectory.h5"
    first = run_extract(run, store_path, k=2)
    assert first.rows_computed == {"global": 5, "local": 5, "target": 3}
    before = read_all(store_path)

    for step in (60, 70, 80):
        copy_tree(short_run.run / f"checkpoint-{step}", run / f"checkpoint-{step}")
    loads: list[tuple[int, str]] = []
    original = AdapterCheckpoint.factors

    def counting(self: AdapterCheckpoint, name: str):  # type: ignore[no-untyped-def]
        loads.append((self.ref.step, name))
        return original(self, name)

    monkeypatch.setattr(AdapterCheckpoint, "factors", counting)
    second = run_extract(run, store_path, k=2)
    monkeypatch.undo()

    assert second.rows_computed == {"global": 3, "local": 3, "target": 3}
    assert not second.rebuilt and second.written
    # Reads: the new checkpoints, the last stored one (L of step 60), the older ends of new targets,
    # and the k+1 = 3 checkpoints before the first new one that its Gram band entries pair it with.
    assert second.steps_read == (30, 40, 50, 60, 70, 80)
    assert sorted(loads) == sorted({(step, name) for step, name in loads})  # each tensor read once
    assert {step for step, _ in loads} == {30, 40, 50, 60, 70, 80}

    after = read_all(store_path)
    for kind, rows in (("global", 5), ("local", 5), ("target", 3)):
        for old, new in zip(before[kind], after[kind], strict=True):
            assert old[:rows].tobytes() == new[:rows].tobytes(), kind  # old rows byte-identical

    scratch = tmp_path / "scratch.h5"
    run_extract(run, scratch, k=2)
    assert_stores_close(store_path, scratch)

    # Nothing new: the store is left as it is.
    data = store_path.read_bytes()
    third = run_extract(run, store_path, k=2)
    assert not third.written and third.rows_computed == {"global": 0, "local": 0, "target": 0}
    assert store_path.read_bytes() == data
    assert third.store_fingerprint == second.store_fingerprint


def test_changed_checkpoint_is_reextracted(short_run: DemoRun, tmp_path: Path) -> None:
    run = select(short_run, tmp_path / "run", (10, 20, 30, 40, 50, 60))
    store_path = tmp_path / "trajectory.h5"
    run_extract(run, store_path, k=2)
    with open_store(store_path) as store:
        fingerprint_before = store.fingerprint()

    # Rewrite checkpoint-30 with other (real PEFT) weights: those of checkpoint-80.
    shutil.copyfile(
        short_run.run / "checkpoint-80" / "adapter_model.safetensors",
        run / "checkpoint-30" / "adapter_model.safetensors",
    )
    summary = run_extract(run, store_path, k=2)
    assert any("step 30" in w and "changed" in w for w in summary.warnings)
    # G of row 2; L of rows 2 and 3; T of rows 0 (ΔW_30 − ΔW_10) and 2 (ΔW_50 − ΔW_30).
    assert summary.rows_computed == {"global": 1, "local": 2, "target": 2}
    assert summary.store_fingerprint != fingerprint_before

    scratch = tmp_path / "scratch.h5"
    run_extract(run, scratch, k=2)
    assert_stores_close(store_path, scratch)
    with open_store(store_path) as store:
        assert_sign_convention(store)


def test_other_k_recomputes_targets_only(short_run: DemoRun, tmp_path: Path) -> None:
    store_path = tmp_path / "trajectory.h5"
    run_extract(short_run.run, store_path, k=2)
    before = read_all(store_path)
    summary = run_extract(short_run.run, store_path, k=3)
    assert summary.rows_computed == {"global": 0, "local": 0, "target": 5}
    assert any("k=2" in w for w in summary.warnings)
    after = read_all(store_path)
    for kind in ("global", "local"):
        for old, new in zip(before[kind], after[kind], strict=True):
            assert old.tobytes() == new.tobytes()
    with open_store(store_path) as store:
        assert store.k == 3 and np.isnan(store.read("target").sigma[5:]).all()
    scratch = tmp_path / "scratch.h5"
    run_extract(short_run.run, scratch, k=3)
    assert_stores_close(store_path, scratch)


def test_other_selection_rebuilds_and_deleted_checkpoints_keep_rows(
    short_run: DemoRun, tmp_path: Path
) -> None:
    store_path = tmp_path / "trajectory.h5"
    run_extract(short_run.run, store_path, k=2, steps=(10, 50))
    summary = run_extract(short_run.run, store_path, k=2, every=20)
    assert summary.rebuilt and summary.steps == (20, 40, 60, 80)
    assert any("rebuilding" in w for w in summary.warnings)

    # A trainer rotating its checkpoints: 10 and 20 are deleted, 60..80 appear.
    run = select(short_run, tmp_path / "run", (10, 20, 30, 40, 50))
    rotating = tmp_path / "rotating.h5"
    run_extract(run, rotating, k=2)
    for step in (10, 20):
        shutil.rmtree(run / f"checkpoint-{step}")
    for step in (60, 70, 80):
        copy_tree(short_run.run / f"checkpoint-{step}", run / f"checkpoint-{step}")
    summary = run_extract(run, rotating, k=2)
    assert not summary.rebuilt and summary.steps == short_run.steps
    assert any("step 10" in w and "deleted" in w for w in summary.warnings)
    assert summary.rows_computed == {"global": 3, "local": 3, "target": 3}
    complete = tmp_path / "complete.h5"
    run_extract(short_run.run, complete, k=2)
    assert_stores_close(rotating, complete)


def write_full_weight_run(short_run: DemoRun, folder: Path, steps: tuple[int, ...]) -> None:
    """The run's adapters merged with PEFT and saved per step as whole models: a full-weight run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(short_run.base, dtype=torch.float32)
    for step in steps:
        adapter = short_run.run / f"checkpoint-{step}"
        merged = PeftModel.from_pretrained(copy.deepcopy(model), adapter).merge_and_unload()
        merged.save_pretrained(folder / f"checkpoint-{step}")
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_full_weight_run_matches_lora_run(short_run: DemoRun, tmp_path: Path) -> None:
    """Merged models saved per step (a full-weight run) give the LoRA store within float32 tolerance."""
    steps = (10, 20, 30, 40, 50)
    full = tmp_path / "full"
    write_full_weight_run(short_run, full, steps)

    full_store, lora_store = tmp_path / "full.h5", tmp_path / "lora.h5"
    summary = run_extract(full, full_store, k=2, base=str(short_run.base))
    run_extract(select(short_run, tmp_path / "lora", steps), lora_store, k=2)
    assert summary.run_kind == "full" and summary.energy_ratio is None
    with open_store(full_store) as dense, open_store(lora_store) as lora:
        # the Gram band from dense float32 deltas agrees with the one from the factors
        np.testing.assert_allclose(dense.gram(), lora.gram(), rtol=1e-4, atol=1e-10, equal_nan=True)
        assert dense.modules == lora.modules  # embeddings, norms, lm_head did not change: not modules
        assert "model.embed_tokens.weight" in dense.carried and "model.norm.weight" in dense.carried
        assert (dense.ranks == 0).all() and dense.scaling_rule == "none"
        for kind in KINDS:
            a, b = dense.read(kind), lora.read(kind)
            np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-4, equal_nan=True)
            # Same sign convention: directions agree with their sign, per module and row.
            for j in range(len(dense.modules)):
                for offsets, x, y in ((dense.u_offset, a.u, b.u), (dense.v_offset, a.v, b.v)):
                    cols = slice(offsets[j], offsets[j + 1])
                    for i in range(len(steps)):
                        if np.isnan(b.sigma[i, j]):
                            assert np.isnan(x[i, cols]).all()
                            continue
                        assert float(x[i, cols] @ y[i, cols]) >= 1 - 1e-3, (kind, j, i)


def test_failures_leave_nothing_behind(short_run: DemoRun, tmp_path: Path) -> None:
    """A bad input raises before any work; a crash during the write keeps the previous store."""
    from nexttools.errors import UserError

    workdir = tmp_path / "work"
    with pytest.raises(UserError, match="no such folder"):
        extract(ExtractOptions(run=tmp_path / "missing", workdir=workdir))
    assert not workdir.exists()

    store_path = tmp_path / "trajectory.h5"
    run_extract(short_run.run, store_path, k=2, steps=(10, 40))
    data = store_path.read_bytes()

    class Boom(Exception):
        pass

    def explode(self: AdapterCheckpoint, name: str) -> None:
        raise Boom

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AdapterCheckpoint, "factors", explode)
        with pytest.raises(Boom):
            run_extract(short_run.run, store_path, k=2)
    assert store_path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trajectory.h5"]
    assert not partial_path(store_path).exists()
