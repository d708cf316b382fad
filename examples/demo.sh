#!/usr/bin/env bash
# `make demo`: build a small LoRA run locally and run the whole pipeline on it (no network).
set -euo pipefail
cd "$(dirname "$0")/.."
NT=.venv/bin/nexttools
rm -rf demo-run
echo "== building the example run: tiny Llama base + 15 PEFT checkpoints (TRL layout) in demo-run/"
.venv/bin/python -m examples.demo_run demo-run
echo "== nexttools extract"
$NT extract demo-run/run --base demo-run/base --workdir demo-run/work
echo "== nexttools fit"
$NT fit --workdir demo-run/work
echo "== nexttools extrapolate --alpha 1.5 (merged HF model)"
$NT extrapolate --alpha 1.5 --workdir demo-run/work
echo "== nexttools extrapolate --alpha 1.5 --format adapter (PEFT adapter to resume LoRA training)"
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
PY
ls -la demo-run/work demo-run/work/extrapolated-alpha1.5
