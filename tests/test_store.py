"""The store on its own: schema v1 on disk, reader, atomic writer, lock and content fingerprint."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from nexttools.errors import UserError
from nexttools.store import (
    KINDS,
    DeltaArrays,
    StoreLayout,
    StoreWriter,
    lock_path,
    open_store,
    partial_path,
    store_lock,
)

LAYOUT = StoreLayout(
    k=2,
    source="runs/demo",
    base_model="/models/base",
    base_fingerprint="basefp",
    run_kind="lora",
    scaling_rule="alpha/r",
    steps=(0, 10, 20, 30),
    paths=("/r/c0", "/r/c10", "/r/c20", "/r/c30"),
    fingerprints=("f0", "f10", "f20", "f30"),
    modules=("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    shapes=((6, 10), (8, 6)),
    ranks=(4, 2),
    carried=("lm_head.weight",),
)


def _random_rows(layout: StoreLayout, seed: int) -> dict[tuple[str, int], DeltaArrays]:
    """Distinct random rows per (kind, module); target rows i > c-k are NaN as extract writes them."""
    rng = np.random.default_rng(seed)
    c = len(layout.steps)
    rows = {}
    for kind in KINDS:
        for j, (out_dim, in_dim) in enumerate(layout.shapes):
            sigma = rng.random(c, dtype=np.float32)
            u = rng.standard_normal((c, out_dim), dtype=np.float32)
            v = rng.standard_normal((c, in_dim), dtype=np.float32)
            if kind == "target":
                sigma[c - layout.k :] = np.nan
                u[c - layout.k :] = np.nan
                v[c - layout.k :] = np.nan
            rows[kind, j] = DeltaArrays(sigma, u, v)
    return rows


def _gram(layout: StoreLayout, j: int) -> np.ndarray:
    """A distinct Gram band per module, ``(C, k+2)``."""
    return np.arange(len(layout.steps) * (layout.k + 2), dtype=np.float64).reshape(-1, layout.k + 2) + j


def _write(path: Path, layout: StoreLayout, rows: dict[tuple[str, int], DeltaArrays]) -> None:
    with store_lock(path), StoreWriter(path, layout) as writer:
        for (kind, j), arrays in rows.items():
            writer.write_module(kind, j, arrays)
        for j in range(len(layout.modules)):
            writer.write_gram(j, _gram(layout, j))
        writer.commit()


def test_round_trip_through_reader_and_plain_h5py(tmp_path: Path) -> None:
    path = tmp_path / "trajectory.h5"
    rows = _random_rows(LAYOUT, seed=1)
    _write(path, LAYOUT, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trajectory.h5"]  # no partial, no lock left

    with open_store(path) as store:
        assert store.layout == LAYOUT
        assert store.version == 1 and store.k == 2
        for kind in KINDS:
            whole = store.read(kind)
            for j in range(2):
                one = store.read_module(kind, j)
                np.testing.assert_array_equal(one.sigma, rows[kind, j].sigma)
                np.testing.assert_array_equal(one.u, rows[kind, j].u)
                np.testing.assert_array_equal(one.v, rows[kind, j].v)
                np.testing.assert_array_equal(whole.sigma[:, j], rows[kind, j].sigma)
                cols = slice(store.u_offset[j], store.u_offset[j + 1])
                np.testing.assert_array_equal(whole.u[:, cols], rows[kind, j].u)
            assert whole.u.dtype == np.float32 and whole.u.shape == (4, 14) and whole.v.shape == (4, 16)
        gram = store.gram()
        assert gram is not None and gram.shape == (2, 4, 4)
        np.testing.assert_array_equal(gram[1], _gram(LAYOUT, 1))

    # The schema exactly as documented, read with nothing but h5py.
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "nexttools.trajectory"
        assert isinstance(f.attrs["version"], np.integer) and f.attrs["version"] == 1
        assert isinstance(f.attrs["k"], np.integer) and f.attrs["k"] == 2
        assert f.attrs["source"] == "runs/demo" and f.attrs["base_model"] == "/models/base"
        assert f.attrs["run_kind"] == "lora" and f.attrs["scaling_rule"] == "alpha/r"
        assert f["checkpoints/step"].dtype == np.int64
        assert list(f["checkpoints/step"][()]) == [0, 10, 20, 30]
        assert list(f["checkpoints/path"].asstr()[()]) == list(LAYOUT.paths)
        assert list(f["checkpoints/fingerprint"].asstr()[()]) == list(LAYOUT.fingerprints)
        assert list(f["modules/name"].asstr()[()]) == list(LAYOUT.modules)
        assert f["modules/shape"][()].tolist() == [[6, 10], [8, 6]]
        assert f["modules/u_offset"][()].tolist() == [0, 6, 14]
        assert f["modules/v_offset"][()].tolist() == [0, 10, 16]
        assert f["modules/rank"][()].tolist() == [4, 2]
        assert list(f["modules/carried"].asstr()[()]) == ["lm_head.weight"]
        for kind in KINDS:
            assert f[f"{kind}/sigma"].shape == (4, 2) and f[f"{kind}/sigma"].dtype == np.float32
        assert np.isnan(f["target/u"][2:]).all() and not np.isnan(f["target/u"][:2]).any()
        assert f["consistency/gram"].shape == (2, 4, 4) and f["consistency/gram"].dtype == np.float64


def test_fingerprint_tracks_identity_not_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _write(a, LAYOUT, _random_rows(LAYOUT, seed=1))
    _write(b, dataclasses.replace(LAYOUT, source="elsewhere"), _random_rows(LAYOUT, seed=2))
    with open_store(a) as sa, open_store(b) as sb:
        reference = sa.fingerprint()
        assert len(reference) == 16 and reference == sb.fingerprint()
    for change in (
        {"k": 1},
        {"fingerprints": ("f0", "f10", "CHANGED", "f30")},
        {"steps": (0, 10, 20, 40)},
        {"modules": ("model.layers.0.mlp.up_proj.weight", LAYOUT.modules[1])},
    ):
        other = dataclasses.replace(LAYOUT, **change)
        _write(b, other, _random_rows(other, seed=3))
        with open_store(b) as store:
            assert store.fingerprint() != reference, change


def test_failed_write_keeps_previous_store_and_removes_partial(tmp_path: Path) -> None:
    path = tmp_path / "trajectory.h5"
    rows = _random_rows(LAYOUT, seed=1)
    _write(path, LAYOUT, rows)
    before = path.read_bytes()

    with pytest.raises(RuntimeError, match="boom"), StoreWriter(path, LAYOUT) as writer:
        writer.write_module("global", 0, rows["global", 0])
        assert partial_path(path).exists()
        raise RuntimeError("boom")
    assert not partial_path(path).exists()
    assert path.read_bytes() == before

    writer = StoreWriter(path, LAYOUT)
    writer.write_module("global", 0, rows["global", 0])
    with pytest.raises(RuntimeError, match="never written"):
        writer.commit()  # an incomplete store is never put in place
    writer.abort()
    assert path.read_bytes() == before and not partial_path(path).exists()

    writer = StoreWriter(path, LAYOUT)
    with pytest.raises(ValueError, match="shape"):
        writer.write_module("local", 1, rows["local", 0])
    writer.abort()


def test_reader_survives_replacement_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "trajectory.h5"
    old = _random_rows(LAYOUT, seed=1)
    _write(path, LAYOUT, old)
    with open_store(path) as store:
        _write(path, LAYOUT, _random_rows(LAYOUT, seed=9))
        np.testing.assert_array_equal(store.read_module("global", 1).u, old["global", 1].u)


def test_open_store_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no trajectory store"):
        open_store(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(UserError, match="not a readable HDF5"):
        open_store(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "something.else"
    with pytest.raises(UserError, match="not a nexttools trajectory store"):
        open_store(other)

    future = tmp_path / "future.h5"
    _write(future, LAYOUT, _random_rows(LAYOUT, seed=1))
    with h5py.File(future, "a") as f:
        f.attrs["version"] = np.int64(2)
    with pytest.raises(UserError, match="version 2") as info:
        open_store(future)
    assert "\n" not in str(info.value)


def test_second_writer_is_refused_and_lock_is_released(tmp_path: Path) -> None:
    path = tmp_path / "trajectory.h5"
    with store_lock(path):
        assert lock_path(path).read_text().strip() == str(os.getpid())
        with (
            pytest.raises(UserError, match=rf"another nexttools process \(pid {os.getpid()}\)"),
            store_lock(path),
        ):
            pass
        # Another process is refused as well (flock is per open file, so this also holds across processes).
        code = textwrap.dedent(
            f"""
            from pathlib import Path
            from nexttools.errors import UserError
            from nexttools.store import store_lock
            try:
                with store_lock(Path({str(path)!r})):
                    print("acquired")
            except UserError as error:
                print(error)
            """
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert f"being written by another nexttools process (pid {os.getpid()})" in result.stdout
    assert not lock_path(path).exists()
    with store_lock(path):  # free again
        pass


def test_lock_of_a_killed_holder_is_free(tmp_path: Path) -> None:
    """kill -9 cannot leave a stale lock: the kernel drops a dead process's flock."""
    path = tmp_path / "trajectory.h5"
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from nexttools.store import store_lock
        with store_lock(Path({str(path)!r})):
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid}"), store_lock(path):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(path).exists()  # left behind by the kill, but not locked
    with store_lock(path):
        pass
