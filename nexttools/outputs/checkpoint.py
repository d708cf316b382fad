"""``--format checkpoint``: a resumable copy of the run's last HF Trainer checkpoint, carrying the jump.

Every file of ``checkpoint-N/`` is copied bit-for-bit (optimizer, scheduler, RNG states,
``trainer_state.json``, tokenizer, ...) except the trained weights, which are written with the jump:

- **full-weight runs** (any method): the model shards, Ŵ = W_c + α·T̂ in every trained module, every
  other tensor and every dtype as the checkpoint has it;
- **LoRA runs**, only with a method that keeps the adapter's rank (``factor-linear``): the adapter file
  with each module's (A', B') in place of (A_c, B_c), same keys, shapes and dtypes, so the saved Adam
  state still matches every parameter.

Any other combination would change a parameter's shape under its optimizer state, and is refused
with a pointer to ``--format base``. Checkpoints whose weights and optimizer live in a DeepSpeed or
FSDP sub-folder are refused too: the trainer would resume from those and ignore the jump.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from nexttools.checkpoints.adapter import AdapterCheckpoint
from nexttools.checkpoints.weights import ModelWeights
from nexttools.errors import UserError
from nexttools.manifest import CARD_NAME, MANIFEST_NAME, Manifest
from nexttools.methods import Method
from nexttools.outputs.adapter import ADAPTER_WEIGHTS, read_adapter_tensors
from nexttools.outputs.base import OutputFormat, OutputPlan, OutputRequest, Weights
from nexttools.outputs.model_folder import CONFIG_NAME, ModuleUpdate, plan_model, write_model
from nexttools.outputs.recipes import code, dtype_kwargs, lora_config
from nexttools.outputs.side import copy_files, sizes_of, writer_file_sizes
from nexttools.ranks import Ranks
from nexttools.run import OpenedRun

TRAINER_STATE = "trainer_state.json"
_ENGINE_FOLDERS = ("global_step", "pytorch_model_fsdp")  # DeepSpeed / accelerate FSDP state


def _copied_files(folder: Path, skip: set[str]) -> dict[str, Path]:
    """Every file under ``folder`` (relative POSIX names) but ``skip``, the card and the manifest."""
    names = sorted(p for p in folder.rglob("*") if p.is_file())
    files = {path.relative_to(folder).as_posix(): path for path in names}
    return {name: path for name, path in files.items() if name not in skip | {CARD_NAME, MANIFEST_NAME}}


class TrainerCheckpoint(OutputFormat):
    name = "checkpoint"
    summary = (
        "a copy of the run's last HF Trainer checkpoint whose trained tensors carry the jump, optimizer "
        "and trainer state kept (full-weight runs; LoRA runs with factor-linear)"
    )
    resumes_in_place = True

    def weights(self, run_kind: str) -> Weights:
        return "adapter" if run_kind == "lora" else "model"

    def check(self, run: OpenedRun, method: Method, dtype: torch.dtype | None) -> None:
        folder = run.last_folder
        if run.shifts:
            raise UserError(
                f"the run folded jumps into its frozen base while training (steps "
                f"{', '.join(map(str, run.shifts.steps))}), which a checkpoint resumed on the original "
                "base would lose: use --format base"
            )
        if run.kind == "lora" and not method.keeps_rank:
            raise UserError(
                f"--format checkpoint keeps the adapter's rank and optimizer state, which --method "
                f"{method.name} cannot (only factor-linear keeps the rank): use --format base to resume "
                "this checkpoint in place"
            )
        if not (folder / TRAINER_STATE).is_file():
            raise UserError(
                f"--format checkpoint copies an HF Trainer checkpoint (checkpoint-N/ with {TRAINER_STATE}); "
                f"{folder} is not one: use --format {'base' if run.kind == 'lora' else 'merged'}"
            )
        engine = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith(_ENGINE_FOLDERS))
        if engine:
            raise UserError(
                f"{folder / engine[0]} holds the trainer's own copy of the weights, which a resume would "
                "load instead of the jump: use --format base or merged"
            )
        if dtype is not None:
            raise UserError("--format checkpoint keeps the checkpoint's dtypes: drop --dtype")

    def plan(self, request: OutputRequest) -> OutputPlan:
        run, jump = request.run, request.jump
        folder = run.last_folder
        last = run.last
        if isinstance(last, AdapterCheckpoint):
            assert jump.new_factors is not None
            tensors = read_adapter_tensors(folder)
            for name, module in last.modules.items():
                tensors[module.key_a], tensors[module.key_b] = jump.new_factors(name)
                if not all(
                    bool(torch.isfinite(t).all()) for t in (tensors[module.key_a], tensors[module.key_b])
                ):
                    raise UserError(f"the jumped factors of {name} are not finite (try a smaller --alpha)")
            copied = _copied_files(folder, {ADAPTER_WEIGHTS, "adapter_model.bin"})
            dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())

            def write_adapter(out: Path, ranks: Ranks) -> None:  # one small file: rank 0 writes it
                if not ranks.writer:
                    return
                copy_files(copied, out)
                save_file(
                    {k: t.contiguous() for k, t in tensors.items()},
                    out / ADAPTER_WEIGHTS,
                    metadata={"format": "pt"},
                )

            size = sum(t.numel() * t.element_size() for t in tensors.values())
            return OutputPlan(sizes_of(copied) | {ADAPTER_WEIGHTS: size}, 1, dtype, write_adapter)

        assert isinstance(last, ModelWeights)
        modules = run.modules
        plan = plan_model(last, modules, changed=modules, untie=False, out_dtype=None)
        device = request.device

        def compute(name: str) -> ModuleUpdate:  # W_c is only read: the method's change reads it too
            return ModuleUpdate(run.weight(run.rows - 1, name), (jump.change(name),), device)

        # Any other copy of the weights would be loaded instead of (or over) the jumped ones.
        stale = {p.name for p in folder.glob("pytorch_model*.bin*")} | {"pytorch_model.bin.index.json"}
        copied = _copied_files(folder, {p.name for p in last.files} | {CONFIG_NAME} | stale)
        files = sizes_of(copied) | writer_file_sizes(plan, request.max_shard_size)

        def write_model_checkpoint(out: Path, ranks: Ranks) -> None:
            if ranks.writer:
                copy_files(copied, out)
            write_model(out, plan, compute, max_shard_size=request.max_shard_size, ranks=ranks)

        shards = sum(1 for name in files if name.endswith(".safetensors") and "/" not in name)
        return OutputPlan(files, shards, plan.dtype, write_model_checkpoint)

    def load_text(self, manifest: Manifest, target: str) -> str:
        return (
            "A trainer checkpoint, not a model to load by itself: resume it (below). Its weights are "
            "those of `--format merged`"
            + (" on the run's base." if manifest.run_kind == "lora" else ".")
            + "\n"
        )

    def resume_text(self, manifest: Manifest, target: str) -> str:
        base = manifest.base_reference
        if manifest.run_kind == "lora":
            model = f'model="{base}", peft_config={lora_config(manifest)}'
        else:
            model = f'model="{base}"'
        return (
            "Resume **in place** with HF Trainer / TRL: the run's own optimizer, scheduler, RNG and data "
            "position come back with the jumped weights.\n\n"
            + code(
                "from trl import GRPOConfig, GRPOTrainer\n\n"
                f"trainer = GRPOTrainer({model},\n"
                f"                      args=GRPOConfig({dtype_kwargs(manifest)}, max_steps=..., ...), ...)\n"
                f'trainer.train(resume_from_checkpoint="{target}")\n'
            )
            + "\nverl and OpenRLHF do not read HF Trainer checkpoints: use `--format base`, `merged` or "
            "`adapter` there.\n"
        )
