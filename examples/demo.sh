#!/usr/bin/env bash
# `make demo`: build a small LoRA run locally and run the whole pipeline on it (no network).
set -euo pipefail
cd "$(dirname "$0")/.."
NT=.venv/bin/nexttools
# Quiet the libraries' own progress bars and deprecation notices: the demo shows nexttools' output.
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore::FutureWarning
rm -rf demo-run
echo "== building the example run: tiny Llama base + 15 PEFT checkpoints (TRL layout) in demo-run/"
echo "   (and the trajectory at step 200, the reference of the toy eval below)"
.venv/bin/python -m examples.demo_run demo-run
echo "== nexttools extract"
$NT extract demo-run/run --base demo-run/base --workdir demo-run/work
echo "== nexttools fit"
$NT fit --workdir demo-run/work
echo "== nexttools backtest: jump from step 100, score with a toy eval (closeness to the run at step 200)"
$NT backtest --workdir demo-run/work \
    --eval-cmd ".venv/bin/python examples/toy_eval.py {model} demo-run/future.safetensors"
echo "== nexttools inspect --plot (the paper's §3 analysis on this run)"
$NT inspect --workdir demo-run/work --plot demo-run/work/inspect.png
echo "== the demo extrapolates anyway, to show every output format: extrapolate repeats the verdict as a warning"
echo "== nexttools extrapolate --alpha 1.5 (merged HF model)"
$NT extrapolate --alpha 1.5 --workdir demo-run/work
echo "== nexttools extrapolate --alpha 1.5 --format base (a new base: resume the run's own checkpoint on it, in place)"
$NT extrapolate --alpha 1.5 --format base --workdir demo-run/work
echo "== nexttools extrapolate --alpha 1.5 --format adapter (PEFT adapter, rank r+1)"
$NT extrapolate --alpha 1.5 --format adapter --workdir demo-run/work
echo "== the merged output loads with transformers and generates"
.venv/bin/python - <<'PY'
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "demo-run/work/extrapolated-alpha1.5"
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
ids = tokenizer("12+34=", return_tensors="pt").input_ids
print(f"{path}: {sum(p.numel() for p in model.parameters())} parameters;",
      "generates:", repr(tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0])))
print("(the demo's base is a random tiny Llama, so the text is gibberish: this shows the model loads and runs)")
PY
echo "== in place: the run's own last adapter on the new base computes the merged output"
.venv/bin/python - <<'PY'
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ids = torch.arange(5, 25)[None, :]
merged = AutoModelForCausalLM.from_pretrained("demo-run/work/extrapolated-alpha1.5")
base = AutoModelForCausalLM.from_pretrained("demo-run/work/extrapolated-alpha1.5-base")
in_place = PeftModel.from_pretrained(base, "demo-run/run/checkpoint-150")
with torch.no_grad():
    gap = (in_place(ids).logits - merged(ids).logits).abs().max().item()
print(f"max |logits(new base + checkpoint-150 adapter) - logits(merged)| = {gap:.1e}")
print("resume in place (TRL): GRPOTrainer(model='demo-run/work/extrapolated-alpha1.5-base', "
      "peft_config=<the run's LoraConfig>, ...).train(resume_from_checkpoint='demo-run/run/checkpoint-150')")
PY
ls -la demo-run/work demo-run/work/extrapolated-alpha1.5
