#!/usr/bin/env bash
# `make demo`: build a small LoRA run locally and run the pipeline on it (no network).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
rm -rf demo-run
$PY -m examples.demo_run demo-run
