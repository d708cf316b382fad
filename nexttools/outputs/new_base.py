"""``--format base``: the run's base with the jump folded in, for an in-place resume of a LoRA run.

W_0'_j = W_0_j + α·T̂_j in every trained module j (plus the base shifts of the jumps ``JumpCallback``
folded in while the run trained, which the checkpoint's adapter sits on); every other tensor is the
base's, bit-for-bit.
The run's own last adapter on W_0' gives W_0 + s·B_c A_c + α·T̂, exactly the weights of
``--format merged`` (in float32 up to float32 rounding; in bf16 the only difference is the single
rounding of W_0'). So the user resumes their *own* checkpoint (adapter, optimizer, scheduler, RNG,
data position) on the new base, instead of restarting with a fresh LoRA and a fresh optimizer.

Tied embeddings: when the run trained one side of a tie, the PEFT model's other side still reads the
original W_0; both are then written and ``tie_word_embeddings`` becomes false, as in the merged output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nexttools.checkpoints.adapter import AdapterCheckpoint
from nexttools.errors import UserError
from nexttools.manifest import Manifest
from nexttools.methods import Method
from nexttools.outputs.base import OutputFormat, OutputPlan, OutputRequest
from nexttools.outputs.model_folder import ModuleUpdate, model_side_files, plan_model, write_model
from nexttools.outputs.recipes import KL_NOTE, code, dtype_kwargs, last_checkpoint, lora_config
from nexttools.outputs.side import copy_files, sizes_of, writer_file_sizes
from nexttools.ranks import Ranks
from nexttools.run import OpenedRun


class NewBase(OutputFormat):
    name = "base"
    summary = "the base with the jump folded in: resume the run's own LoRA checkpoint on it, in place"
    lora_only = True
    resumes_in_place = True

    def check(self, run: OpenedRun, method: Method, dtype: torch.dtype | None) -> None:
        last = run.last
        assert isinstance(last, AdapterCheckpoint)
        both = sorted(set(last.carried) & set(run.modules))
        if both:
            raise UserError(
                f"{both[0]} is both a LoRA module and a tensor the adapter saves whole: resuming would "
                "load the saved tensor over the new base; use --format merged or adapter"
            )

    def plan(self, request: OutputRequest) -> OutputPlan:
        run, jump, device = request.run, request.jump, request.device
        modules = run.modules
        plan = plan_model(run.base, modules, changed=modules, untie=True, out_dtype=request.dtype)

        def compute(name: str) -> ModuleUpdate:  # the shifts folded in while training stay folded in
            shift = run.shift(run.rows - 1, name)
            changes = (jump.change(name),) if shift is None else (shift, jump.change(name))
            return ModuleUpdate(plan.template.get(plan.source_name[name]), changes, device)

        side = model_side_files(run.base_path, run.base_path, remote_code_from=run.base_path)
        files = writer_file_sizes(plan, request.max_shard_size) | sizes_of(side)

        def write(folder: Path, ranks: Ranks) -> None:
            write_model(folder, plan, compute, max_shard_size=request.max_shard_size, ranks=ranks)
            if ranks.writer:
                copy_files(side, folder)

        shards = sum(1 for name in files if name.endswith(".safetensors"))
        return OutputPlan(files, shards, plan.dtype, write, untied=plan.untied)

    def load_text(self, manifest: Manifest, target: str) -> str:
        checkpoint = last_checkpoint(manifest)
        return (
            "A new **base** model, not the extrapolated model by itself: the run's own last adapter "
            f"(`{checkpoint}`) on top of it gives the extrapolated weights.\n\n"
            + code(
                "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f'base = AutoModelForCausalLM.from_pretrained("{target}", dtype="auto")\n'
                f'model = PeftModel.from_pretrained(base, "{checkpoint}")  # = the merged output\n'
            )
        )

    def resume_text(self, manifest: Manifest, target: str) -> str:
        checkpoint = last_checkpoint(manifest)
        return (
            "Resume **in place**: the same trainer, the same LoRA config, this folder as the model, and "
            "the run's own last checkpoint, whose adapter, optimizer, scheduler, RNG and data position "
            "are restored unchanged.\n\n"
            "- **TRL** (and any HF-Trainer-based trainer):\n\n"
            + code(
                "from peft import LoraConfig\nfrom trl import GRPOConfig, GRPOTrainer\n\n"
                f'trainer = GRPOTrainer(model="{target}", peft_config={lora_config(manifest)},\n'
                f"                      args=GRPOConfig({dtype_kwargs(manifest)}, max_steps=..., ...), ...)\n"
                f'trainer.train(resume_from_checkpoint="{checkpoint}")\n'
            )
            + "\n  Use the run's own `target_modules` (a `LoraConfig` without them trains only q/v on "
            "Llama and Qwen, and the checkpoint's adapter would not load), and the run's dtype in "
            "`model_init_kwargs` (TRL loads float32 otherwise). The step counter continues from the "
            "checkpoint's `global_step`: `max_steps` is the total.\n"
            "- **verl**: no verified in-place resume. Its resume (`trainer.resume_mode=resume_path`) loads "
            "each rank's saved model state dict whole, base weights included (unless the run used "
            "`checkpoint.save_lora_only=True`), over `actor_rollout_ref.model.path`. An untested route "
            "from verl's code: `actor_rollout_ref.actor.checkpoint.load_contents=[optimizer,extra]`, this "
            "folder as `actor_rollout_ref.model.path`, and the run's own adapter (`nexttools extrapolate "
            "--method rl-extra --alpha 0 --format adapter`) as `actor_rollout_ref.model.lora_adapter_path`.\n"
            "- **OpenRLHF**: has no option to continue a run's adapter, so no in-place resume; use "
            "`--format merged`.\n\n"
            f"{KL_NOTE} In TRL a LoRA policy's reference is the model with the adapter disabled: this new "
            "base, W_0 + α·T̂.\n"
        )
