"""``--format merged`` (default): a drop-in Hugging Face model, Ŵ = W_c + α·T̂ in every trained module.

W_c is the whole merged last checkpoint (base + its full LoRA delta, not a rank-1 truncation). Every
tensor that is not a trained module is copied bit-for-bit from where it lives: the base for a LoRA
run (the adapter's own copy for ``modules_to_save``), the last checkpoint for a full-weight run.
Resuming from it is a *restart*: a fresh LoRA (B = 0) and a fresh optimizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nexttools.checkpoints.adapter import AdapterCheckpoint
from nexttools.manifest import Manifest
from nexttools.outputs.base import OutputFormat, OutputPlan, OutputRequest
from nexttools.outputs.model_folder import ModuleUpdate, model_side_files, plan_model, write_model
from nexttools.outputs.recipes import KL_NOTE, code, dtype_kwargs, lora_config
from nexttools.outputs.side import copy_files, sizes_of, writer_file_sizes
from nexttools.ranks import Ranks


class Merged(OutputFormat):
    name = "merged"
    summary = "a merged Hugging Face model (resume by restarting: a fresh LoRA and optimizer)"

    @property
    def suffix(self) -> str:
        return ""

    def plan(self, request: OutputRequest) -> OutputPlan:
        run, jump = request.run, request.jump
        last = run.last
        carried = set(last.carried) if isinstance(last, AdapterCheckpoint) else set()
        template = run.base if run.kind == "lora" else last
        assert not isinstance(template, AdapterCheckpoint)
        modules = run.modules
        plan = plan_model(
            template,
            modules,
            changed=set(modules) | carried,
            untie=run.kind == "lora",
            out_dtype=request.dtype,
        )
        device = request.device

        def compute(name: str) -> ModuleUpdate:
            if isinstance(last, AdapterCheckpoint):  # W_c = the stored weight + the last LoRA delta
                stored = (
                    last.carried_tensor(name)
                    if name in carried
                    else plan.template.get(plan.source_name[name])
                )
                # W_c = W_0 + its base shifts + s·B_c A_c: ``run.factors`` holds both
                return ModuleUpdate(stored, (run.factors(run.rows - 1, name), jump.change(name)), device)
            return ModuleUpdate(run.weight(run.rows - 1, name), (jump.change(name),), device)

        def carried_tensor(name: str) -> torch.Tensor | None:
            return (
                last.carried_tensor(name) if isinstance(last, AdapterCheckpoint) and name in carried else None
            )

        side = model_side_files(run.last_folder, run.base_path, remote_code_from=template.folder)
        files = writer_file_sizes(plan, request.max_shard_size) | sizes_of(side)

        def write(folder: Path, ranks: Ranks) -> None:
            write_model(
                folder,
                plan,
                compute,
                max_shard_size=request.max_shard_size,
                ranks=ranks,
                overrides=carried_tensor,
            )
            if ranks.writer:
                copy_files(side, folder)

        shards = sum(1 for name in files if name.endswith(".safetensors"))
        return OutputPlan(files, shards, plan.dtype, write, untied=plan.untied)

    def load_text(self, manifest: Manifest, target: str) -> str:
        return (
            "A drop-in Hugging Face model: config, generation config, tokenizer and chat template.\n\n"
            + code(
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{target}", dtype="auto")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{target}")\n'
            )
        )

    def resume_text(self, manifest: Manifest, target: str) -> str:
        lora = manifest.lora or {}
        rank, alpha = lora.get("r", "R"), lora.get("lora_alpha", "ALPHA")
        return (
            "This is a **restart**: a fresh LoRA (B = 0) and a fresh optimizer on top of the jumped "
            "model. In a smooth run a restart alone cost more steps than a perfect jump gained; for a "
            "LoRA run, `--format base` resumes the run's own adapter and optimizer in place.\n\n"
            "- **TRL**:\n\n"
            + code(
                "from peft import LoraConfig\nfrom trl import GRPOConfig, GRPOTrainer\n\n"
                f'trainer = GRPOTrainer(model="{target}", peft_config={lora_config(manifest)},\n'
                f"                      args=GRPOConfig({dtype_kwargs(manifest)}, ...), ...)\n"
            )
            + "\n  Without `model_init_kwargs` TRL loads the model in float32; a `LoraConfig` without "
            "`target_modules` trains only q/v on Llama and Qwen.\n"
            f"- **verl**: `actor_rollout_ref.model.path={target} actor_rollout_ref.model.lora_rank={rank} "
            f"actor_rollout_ref.model.lora_alpha={alpha} "
            "actor_rollout_ref.model.target_modules=all-linear`.\n"
            f"- **OpenRLHF**: `--actor.model_name_or_path {target} --ds.lora.rank {rank} "
            f"--ds.lora.alpha {alpha} --ds.lora.target_modules all-linear` (or no LoRA flags for full "
            "fine-tuning).\n\n"
            f"{KL_NOTE}\n"
        )
