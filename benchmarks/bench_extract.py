"""``extract`` on a Qwen2.5-1.5B-shaped LoRA run (r=64, 15 fp32 checkpoints), against two references.

- **read**: reading every adapter file once with safetensors (``safe_open`` + ``get_tensor`` of every
  key, each tensor then summed so that its bytes are really read; warm page cache), the floor for
  any extractor. Without the sum nothing would be read: safetensors 0.8 returns tensors backed by a
  memory map (measured: 0.1 s for 4.4 GB). Raw byte reads are reported beside it;
- **dense SVD**: the reference method (materialise each merged delta, ``torch.linalg.svd``), timed on
  one module of each kind for one delta and scaled to every module and every G, L and T row.

``extract`` (a fresh child process each time, start-up included) and the floor are each timed
``REPEATS`` times and the fastest run of each is reported, beside every run. Peak RSS is the highest
of the ``extract`` child processes' own.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks.common import qwen_run, read_files, run_child
from benchmarks.synthetic_qwen import LAYERS, PROJECTIONS

REPEATS = 2


def read_with_safetensors(path: Path) -> None:
    """Read every tensor of ``path``, one at a time, as an extractor must (the sum touches every byte)."""
    with safe_open(path, "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            handle.get_tensor(key).sum()


def dense_reference_seconds(run: Path, k: int = 5) -> dict[str, float]:
    """Seconds the reference spends on one L delta per module kind (layer 0), and the scaled total."""
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    config = json.loads((run / f"checkpoint-{steps[-1]}" / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    newer, older = (run / f"checkpoint-{s}" / "adapter_model.safetensors" for s in (steps[-1], steps[-2]))
    per_kind = {}
    for name, (block, _, _) in PROJECTIONS.items():
        key = f"base_model.model.model.layers.0.{block}.{name}"
        start = time.perf_counter()
        deltas = []
        for path in (newer, older):
            with safe_open(path, "pt") as handle:
                a, b = handle.get_tensor(f"{key}.lora_A.weight"), handle.get_tensor(f"{key}.lora_B.weight")
            deltas.append(scaling * (b @ a))
        torch.linalg.svd(deltas[0] - deltas[1], full_matrices=False)
        per_kind[name] = time.perf_counter() - start
    rows_per_module = len(steps) * 2 + (len(steps) - k)  # G and L for every checkpoint, T for c-k
    total = sum(per_kind.values()) * LAYERS * rows_per_module
    return {"per_kind_seconds": per_kind, "scaled_total_seconds": total}


def gram_floor_seconds(run: Path, k: int = 5) -> float:
    """The floor: only the float64 Gram products ``extract`` needs, on the same factors, timed alone.

    Per module and checkpoint i, for each side X ∈ {s·B, Aᵀ} (rows × r and cols × r), the products
    X_iᵀ X_j for j = i (the self Gram) and i−1 … i−k−1 (the local delta, the Gram band of
    ``consistency``, and i−k: the target delta of row i−k), each unordered pair once. They are done
    the fastest way measured here: the checkpoints' factors of one side stacked transposed, float64,
    as one (C·r, d) block, and one GEMM per checkpoint, X_iᵀ against its k+1 predecessors and itself
    (28 GFLOP/s against 15 for one pair at a time, on one core), with one thread per core, one module
    per thread, largest first. The factors are read and converted first, untimed, a layer at a time.
    """
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    config = json.loads((run / f"checkpoint-{steps[-1]}" / "adapter_config.json").read_text())
    scaling, rank = config["lora_alpha"] / config["r"], config["r"]
    paths = [run / f"checkpoint-{s}" / "adapter_model.safetensors" for s in steps]
    handles = [safe_open(path, "pt") for path in paths]
    workers = torch.get_num_threads()

    def products(sides: tuple[torch.Tensor, torch.Tensor]) -> None:
        for stacked in sides:
            for i in range(len(steps)):
                first = max(i - k - 1, 0)
                _ = stacked[i * rank : (i + 1) * rank] @ stacked[first * rank : (i + 1) * rank].T

    total = 0.0
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for layer in range(LAYERS):
            modules = []
            for name, (block, _, _) in PROJECTIONS.items():
                key = f"base_model.model.model.layers.{layer}.{block}.{name}"
                left = [(scaling * h.get_tensor(f"{key}.lora_B.weight")).T for h in handles]
                right = [h.get_tensor(f"{key}.lora_A.weight") for h in handles]
                modules.append((torch.cat(left).double(), torch.cat(right).double()))
            # Largest first, so that the threads finish the layer together (in file order the last
            # big module runs alone: measured 19% idle time at each layer's end on two threads).
            modules.sort(key=lambda sides: -sum(side.shape[1] for side in sides))
            start = time.perf_counter()
            list(pool.map(products, modules))
            total += time.perf_counter() - start
    return total


def main(workdir: Path | None = None) -> dict:
    """Time ``extract`` into ``workdir`` (kept, for the fit and extrapolate benchmarks) or a scratch one."""
    base, run = qwen_run()
    files = sorted(run.glob("checkpoint-*/adapter_model.safetensors"))
    read_files(files)  # warm the page cache: every timing below starts from the same state
    start = time.perf_counter()
    nbytes = read_files(files)
    raw_read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for path in files:
        read_with_safetensors(path)
    read_seconds = time.perf_counter() - start

    scratch = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="bench-extract-"))
    # Best of REPEATS for extract and for its floor alike: single runs of either varied by ±10% on
    # the shared 2-core machine (36-44 s for the same one-core extract).
    children, floors = [], []
    try:
        for _ in range(REPEATS):
            shutil.rmtree(workdir, ignore_errors=True)  # a fresh extraction, not an incremental no-op
            args = ["extract", str(run), "--base", str(base), "--workdir", str(workdir), "--json"]
            children.append(run_child(args))
    finally:
        if scratch:
            shutil.rmtree(workdir, ignore_errors=True)
    reference = dense_reference_seconds(run)
    for _ in range(REPEATS):
        floors.append(gram_floor_seconds(run))
    child, floor = min(children, key=lambda c: c["seconds"]), min(floors)
    return {
        "repeats": REPEATS,
        "extract_runs_seconds": [c["seconds"] for c in children],
        "gram_floor_runs_seconds": floors,
        "gram_floor_seconds": floor,
        "extract_over_floor": child["seconds"] / floor,
        "adapter_bytes": nbytes,
        "raw_read_seconds": raw_read_seconds,
        "read_seconds": read_seconds,
        "extract_seconds": child["seconds"],
        "extract_peak_rss_mib": max(c["peak_rss_mib"] for c in children),
        "extract_over_read": child["seconds"] / read_seconds,
        "dense_reference_seconds": reference["scaled_total_seconds"],
        "dense_reference_per_kind": reference["per_kind_seconds"],
        "speedup_vs_dense": reference["scaled_total_seconds"] / child["seconds"],
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
