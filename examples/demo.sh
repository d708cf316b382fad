#!/usr/bin/env bash
# `make demo`: build a small LoRA run locally and run the whole pipeline on it (no network).
set -euo pipefail
cd "$(dirname "$0")/.."
NT=.venv/bin/nexttools
# Quiet the libraries' own progress bars and deprecation notices: the demo shows nexttools' output.
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore::FutureWarning
rm -rf demo-run
echo "== the example run: tiny Llama base + 15 PEFT checkpoints (TRL layout), demo-run/"
echo "   (and the trajectory at step 200, the reference of the toy eval below)"
.venv/bin/python -m examples.demo_run demo-run
echo "== nexttools extract"
$NT extract demo-run/run --base demo-run/base --workdir demo-run/work
echo "== nexttools fit (the predictor, and how well each method predicts in parameter space)"
$NT fit --workdir demo-run/work
echo "== nexttools backtest: which jump pays? Each method jumps from steps 40, 70, 100; a toy eval scores it"
echo "   (closeness to the run at step 200; your own eval on a real run)"
$NT backtest --workdir demo-run/work \
    --eval-cmd ".venv/bin/python examples/toy_eval.py {model} demo-run/future.safetensors"
echo "== nexttools inspect --plot (the paper's §3 analysis on this run)"
$NT inspect --workdir demo-run/work --plot demo-run/work/inspect.png
echo "== nexttools extrapolate: follows the back-test's recommendation, written to resume in place"
$NT extrapolate --workdir demo-run/work --json > demo-run/work/in-place.json
echo "== the check: the run's own last adapter on the new base is the same jump, merged"
$NT extrapolate --workdir demo-run/work --format merged --json > demo-run/work/merged.json
.venv/bin/python - <<'PY'
import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

in_place = json.load(open("demo-run/work/in-place.json"))
merged_path = json.load(open("demo-run/work/merged.json"))["out"]
ids = torch.arange(5, 25)[None, :]
merged = AutoModelForCausalLM.from_pretrained(merged_path)
base = AutoModelForCausalLM.from_pretrained(in_place["out"])
resumed = PeftModel.from_pretrained(base, "demo-run/run/checkpoint-150")
with torch.no_grad():
    gap = (resumed(ids).logits - merged(ids).logits).abs().max().item()
print(f"{in_place['method']} at α={in_place['alpha']:g}: the weights now stand at step {in_place['target_step']:.0f}")
print(f"max |logits(new base + checkpoint-150 adapter) - logits(merged)| = {gap:.1e}")
tokenizer = AutoTokenizer.from_pretrained(merged_path)
text = tokenizer.decode(merged.generate(tokenizer("12+34=", return_tensors="pt").input_ids, max_new_tokens=8, do_sample=False)[0])
print(f"the merged model loads with transformers and generates: {text!r} (a random tiny Llama: gibberish)")
print(f"resume in place (TRL): GRPOTrainer(model={in_place['out']!r}, peft_config=<the run's LoraConfig>, "
      "...).train(resume_from_checkpoint='demo-run/run/checkpoint-150')")
PY
