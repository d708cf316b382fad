#!/usr/bin/env bash
# The real-LLM sweep at GPU size, on one GPU, in about 10 minutes: SmolLM2-135M-Instruct, LoRA GRPO
# with TRL, 3 seeds, 16 prompts x 4 per step, budget 80, 256 held-out prompts (examples/real_llm/sweep.py).
#
#   bash examples/real_llm/gpu.sh [OUT]        # resumable; results in OUT/summary.json
#
# Needs the examples venv with a CUDA torch and the prepared model (`make real-llm`, copied to the
# machine: it has no hub). Run from the repository root.
set -euo pipefail
out="${1:-real-llm-gpu}"
python="${PYTHON:-.venv-examples/bin/python}"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
"$python" -m examples.real_llm.sweep --out "$out" --seeds 0 1 2 --budget 80 --prompts 16 --heldout 256
