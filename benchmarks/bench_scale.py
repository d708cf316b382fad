"""``extract`` and ``extrapolate`` on a Llama-3-8B-shaped run, and the arithmetic that projects 8B and 70B.

The run has 4 of Llama-3-8B's 32 layers at their real shapes (hidden 4096, intermediate 14336, kv
1024, vocab 128256, untied embeddings), LoRA r = 64 on the seven projections, 15 checkpoints. Both
commands run in a child process each (wall time, peak RSS); ``extrapolate`` writes the merged bf16
model with ``last-interval`` (no predictor to train), beside a plain copy of the base.

Projection (per the layer count, the work that scales with it):
- ``extract`` reads and reduces each module on its own, so its time is linear in the number of
  modules × (rows + cols) of each: 32 / 4 × for 8B; 70B (80 layers, hidden 8192, intermediate 28672)
  has 1.98× the per-layer (rows + cols) of 8B, so 80 / 4 × 1.98 ×. Its peak RSS does not grow with
  the layer count.
- ``extrapolate`` is a copy of the base with every trained module recomputed: its time scales with
  the bytes written (the 4-layer model is 3.8 GB, 8B is 16.1 GB, 70B 141 GB). Modules are computed
  and written in 32 MiB row blocks, so its peak RSS is set by the largest module's base weight as
  stored (14336 × 4096 × 2 B = 117 MB for 8B, 28672 × 8192 × 2 B = 470 MB for 70B) plus a few
  blocks and the Python/torch baseline.

    python -m benchmarks.bench_scale        # also part of `make bench`
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import DATA, read_files, run_child, timed
from benchmarks.synthetic_qwen import LLAMA3_8B, Shape, write_base, write_run

LAYERS = 4
RSS_BOUND_MIB = 1024
LLAMA3_70B = Shape(
    hidden=8192, intermediate=28672, kv=1024, layers=80, vocab=128256, heads=64, tied=False, qkv_bias=False
)


def llama_run() -> tuple[Path, Path]:
    """(base, run) of the 4-layer Llama-3-8B-shaped run, written on first use (~5 GB)."""
    base, run = DATA / "llama8b-4layers" / "base", DATA / "llama8b-4layers" / "run"
    if not (base / "model.safetensors").exists():
        write_base(base, layers=LAYERS, shape=LLAMA3_8B)
    if not (run / "checkpoint-150" / "trainer_state.json").exists():
        write_run(run, base, layers=LAYERS, shape=LLAMA3_8B)
    return base, run


def _per_layer_extent(shape: Shape) -> int:
    """Σ (rows + cols) over one layer's seven projections: what extract's work per layer is linear in."""
    return sum(out_dim + in_dim for _, out_dim, in_dim in shape.projections.values())


def _model_bytes(shape: Shape, layers: int) -> int:
    """bf16 bytes of a model: embeddings (and lm_head when untied), projections, norms."""
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    per_layer = sum(o * i for _, o, i in shape.projections.values()) + 2 * shape.hidden
    return 2 * (embeddings + layers * per_layer + shape.hidden)


def main() -> dict:
    base, run = llama_run()
    files = sorted(base.glob("*.safetensors"))
    read_files(files)
    scratch = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        workdir = scratch / "work"
        extract = run_child(["extract", str(run), "--base", str(base), "--workdir", str(workdir)])
        copy_seconds = timed(lambda: [shutil.copyfile(f, scratch / f.name) for f in files])
        for f in files:
            (scratch / f.name).unlink()
        out = scratch / "merged"
        args = ["--method", "last-interval", "--alpha", "1.5", "--format", "merged", "--out", str(out)]
        args += ["--device", "cpu"]
        extrapolate = run_child(["extrapolate", "--workdir", str(workdir), *args])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    layer_ratio = _per_layer_extent(LLAMA3_70B) / _per_layer_extent(LLAMA3_8B)
    bytes_4, bytes_8b = _model_bytes(LLAMA3_8B, LAYERS), _model_bytes(LLAMA3_8B, 32)
    bytes_70b = _model_bytes(LLAMA3_70B, 80)
    return {
        "layers_measured": LAYERS,
        "extract_seconds": extract["seconds"],
        "extract_peak_rss_mib": extract["peak_rss_mib"],
        "extrapolate_seconds": extrapolate["seconds"],
        "extrapolate_peak_rss_mib": extrapolate["peak_rss_mib"],
        "copy_seconds": copy_seconds,
        "rss_bound_mib": RSS_BOUND_MIB,
        "model_bytes_4_layers": bytes_4,
        "model_bytes_8b": bytes_8b,
        "model_bytes_70b": bytes_70b,
        "per_layer_extent_70b_over_8b": layer_ratio,
        "projected_extract_seconds_8b": extract["seconds"] * 32 / LAYERS,
        "projected_extract_seconds_70b": extract["seconds"] * 80 / LAYERS * layer_ratio,
        "projected_extrapolate_seconds_8b": extrapolate["seconds"] * bytes_8b / bytes_4,
        "projected_extrapolate_seconds_70b": extrapolate["seconds"] * bytes_70b / bytes_4,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
