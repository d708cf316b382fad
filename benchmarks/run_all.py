"""``make bench``: extract → fit → extrapolate on the Qwen2.5-1.5B-shaped synthetic run.

Writes every figure to ``bench-out/results.json`` and prints the README's table. The synthetic run
(~7 GB) is generated on first use under ``bench-out/data`` (``NEXTTOOLS_BENCH_DATA`` overrides).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from benchmarks import (
    bench_cli,
    bench_extract,
    bench_extrapolate,
    bench_fit,
    bench_load,
    bench_reads,
    bench_scale,
    bench_verl_shards,
)
from benchmarks.common import qwen_run

WORKDIR = Path("bench-out/work")
RESULTS = Path("bench-out/results.json")


def table(results: dict) -> str:
    """The Markdown table recorded in the README."""
    ex, fi, xp = results["extract"], results["fit"], results["extrapolate"]
    vs, rd, ld, sc = results["verl_shards"], results["reads"], results["load"], results["scale"]
    rows = [
        (
            "extract, vs only its float64 Gram products on the same factors (the floor)",
            f"{ex['extract_over_floor']:.1f}×",
            f"{ex['extract_seconds']:.0f} s vs {ex['gram_floor_seconds']:.1f} s",
            "≤ 2×",
        ),
        (
            "extract, vs reading the adapters with safetensors",
            f"{ex['extract_over_read']:.1f}×",
            f"{ex['extract_seconds']:.0f} s vs {ex['read_seconds']:.1f} s",
            "≤ 5×",
        ),
        (
            "extract, speed-up over dense merge + `torch.linalg.svd`",
            f"{ex['speedup_vs_dense']:.0f}×",
            f"{ex['dense_reference_seconds']:.0f} s (sampled, scaled) vs {ex['extract_seconds']:.0f} s",
            "≥ 100×",
        ),
        ("extract, peak RSS", f"{ex['extract_peak_rss_mib']:.0f} MiB", "", "< 1536 MiB"),
        ("fit (defaults), wall time", f"{fi['fit_seconds']:.0f} s", "", "< 600 s"),
        ("fit, peak RSS", f"{fi['fit_peak_rss_mib']:.0f} MiB", "", "reported"),
        (
            "extrapolate merged bf16, vs copying the base",
            f"{xp['extrapolate_over_copy']:.1f}×",
            f"{xp['extrapolate_seconds']:.0f} s vs {xp['copy_seconds']:.1f} s",
            "≤ 1.5×",
        ),
        (
            "extract on verl FSDP shards with the base inside, peak RSS",
            f"{vs['verl_shards_peak_rss_mib']:.0f} MiB",
            f"3 shards of {vs['shard_mib']:.0f} MiB; the same adapters as PEFT folders: "
            f"{vs['peft_folders_peak_rss_mib']:.0f} MiB",
            "bounded by the LoRA tensors",
        ),
        (
            "extrapolate, peak RSS (2 GB shards)",
            f"{xp['extrapolate_peak_rss_mib']:.0f} MiB",
            "",
            f"< {xp['rss_bound_mib']:.0f} MiB",
        ),
        (
            'tensor reads, `safe_open(backend="pread")` vs nexttools\' positioned reads',
            f"{rd['pread_over_nexttools']:.1f}× the time",
            f"{rd['safe_open-pread_seconds']:.1f} s vs {rd['nexttools_seconds']:.1f} s for "
            f"{rd['file_mib'] / 1024:.1f} GiB; peak RSS {rd['safe_open-pread_peak_rss_mib']:.0f} vs "
            f"{rd['nexttools_peak_rss_mib']:.0f} MiB "
            f"(memory map: {rd['safe_open-mmap_peak_rss_mib']:.0f} MiB)",
            "swap only if ≤ 1× at equal RSS",
        ),
    ]
    rows += [
        (
            f"{name}, beside one CPU-bound process / alone",
            f"{ld[f'{name}_loaded_over_idle']:.2f}×",
            f"{ld[f'{name}_loaded_seconds']:.0f} s vs {ld[f'{name}_idle_seconds']:.0f} s",
            "≤ 2×",
        )
        for name in ("extract", "fit")
    ]
    rows += [
        (
            f"{name}, Llama-3-8B-shaped run (4 of 32 layers, r = 64, 15 checkpoints)",
            f"{sc[f'{name}_seconds']:.0f} s, peak RSS {sc[f'{name}_peak_rss_mib']:.0f} MiB",
            f"projected: 8B {sc[f'projected_{name}_seconds_8b'] / 60:.1f} min, "
            f"70B {sc[f'projected_{name}_seconds_70b'] / 60:.0f} min",
            f"RSS < {sc['rss_bound_mib']} MiB",
        )
        for name in ("extract", "extrapolate")
    ]
    cli = results["cli"]
    rows += [
        (
            f"`nexttools {argv}`, wall time vs `python -c pass`",
            f"{cli[f'{name}_seconds']:.2f} s",
            f"{cli[f'{name}_over_python']:.1f}× ({cli['python_seconds']:.2f} s)",
            target,
        )
        for name, argv, target in (
            ("help", "--help", "≤ 0.5 s"),
            ("unknown_command", "bogus", "≤ 0.5 s"),
            ("extract_help", "extract --help", "≤ 0.5 s"),
        )
    ]
    lines = ["| figure | measured | detail | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (Linux), or the platform's word for it: the floor's GEMMs, and so
    extract's ratio to them, differ between CPUs by several times."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    qwen_run()  # generate the data first, so that no timing includes it
    results = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "extract": bench_extract.main(WORKDIR),
    }
    results["fit"] = bench_fit.main(WORKDIR)
    results["extrapolate"] = bench_extrapolate.main(WORKDIR)
    results["verl_shards"] = bench_verl_shards.main(WORKDIR / "verl")
    results["reads"] = bench_reads.main()
    results["load"] = bench_load.main(WORKDIR)
    results["scale"] = bench_scale.main()
    results["cli"] = bench_cli.main()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nall figures: {RESULTS}")


if __name__ == "__main__":
    main()
