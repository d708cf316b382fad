"""Peak RSS of ``extract`` on verl FSDP shards that hold the base weights, against the same adapters as
PEFT folders: reading the shards must cost the LoRA tensors, not the shard size.

The run: 3 checkpoints of a model with 4 Llama-shaped layers (hidden 2048, intermediate 5632, fp32),
LoRA r = 64 on q, k, v, o, gate, up and down; each ``model_world_size_1_rank_0.pt`` holds every base
weight (``base_layer``) beside the LoRA tensors, as verl writes it without ``save_lora_only``.
Run alone with ``python -m benchmarks.bench_verl_shards``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, LAYERS, RANK = 2048, 5632, 4, 64
STEPS = (10, 20, 30)
SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def _names() -> list[str]:
    return [f"model.layers.{i}.{module}" for i in range(LAYERS) for module in SHAPES]


def build(root: Path) -> tuple[Path, Path, Path]:
    """(base, verl run, PEFT run) under ``root``, generated once."""
    base, verl, peft = root / "base", root / "verl", root / "peft"
    if (root / "done").is_file():
        return base, verl, peft
    base.mkdir(parents=True, exist_ok=True)
    weights = {f"{n}.weight": torch.zeros(SHAPES[n.split(".", 3)[3]]) for n in _names()}
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(0)
    for step in STEPS:
        lora: dict[str, torch.Tensor] = {}
        for name in _names():
            out_dim, in_dim = SHAPES[name.split(".", 3)[3]]
            lora[f"base_model.model.{name}.lora_A.weight"] = (
                torch.randn(RANK, in_dim, generator=generator) * 0.01
            )
            lora[f"base_model.model.{name}.lora_B.weight"] = (
                torch.randn(out_dim, RANK, generator=generator) * step * 1e-4
            )
        folder = peft / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(lora, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "r": RANK,
            "lora_alpha": 2 * RANK,
            "target_modules": sorted({m.split(".")[-1] for m in SHAPES}),
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        actor = verl / f"global_step_{step}" / "actor"
        actor.mkdir(parents=True)
        # verl keeps PEFT's in-memory keys: the adapter name after lora_A / lora_B
        shard = {key.replace(".weight", ".default.weight"): t for key, t in lora.items()}
        shard |= {
            f"base_model.model.{name}.base_layer.weight": weights[f"{name}.weight"] for name in _names()
        }
        torch.save(shard, actor / "model_world_size_1_rank_0.pt")
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
        (actor / "lora_train_meta.json").write_text(
            json.dumps({"r": RANK, "lora_alpha": 2 * RANK, "task_type": "CAUSAL_LM"})
        )
    (root / "done").touch()
    return base, verl, peft


def _peak_rss(run: Path, base: Path, workdir: Path) -> float:
    args = [sys.executable, "-m", "benchmarks.peak_rss", "extract", str(run), "--base", str(base)]
    result = subprocess.run(
        [*args, "--workdir", str(workdir), "--device", "cpu"], capture_output=True, text=True, check=True
    )
    return float(json.loads(result.stderr.strip().splitlines()[-1])["peak_rss_mib"])


def main(workdir: Path, data: Path = Path("bench-out/verl-data")) -> dict[str, float]:
    base, verl, peft = build(data)
    shard_mib = (
        verl / f"global_step_{STEPS[0]}" / "actor" / "model_world_size_1_rank_0.pt"
    ).stat().st_size / 2**20
    figures = {
        "shard_mib": round(shard_mib, 1),
        "verl_shards_peak_rss_mib": _peak_rss(verl, base, workdir / "verl"),
        "peft_folders_peak_rss_mib": _peak_rss(peft, base, workdir / "peft"),
    }
    return figures


if __name__ == "__main__":
    print(json.dumps(main(Path("bench-out/work-verl")), indent=2))
