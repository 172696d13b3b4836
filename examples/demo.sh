#!/usr/bin/env bash
# `make demo`: the main job on this machine. A tiny random DeepSeek-V3 (make-mini) is converted to
# Megatron at TP2 x PP2 x EP2 (4 gloo ranks on CPU, experts split over the TP ranks) and compared
# layer by layer against the HF model: a PASS/FAIL table like seed 001's.
set -euo pipefail
cd "$(dirname "$0")/.."
export PY=${PY:-$PWD/.venv/bin/python}
{ "$PY" -m megatron_patch.cli env-check 2>/dev/null || true; } | head -5  # head closes the pipe early
echo
bash examples/deepseek_v3/run_mini_deepseek_test.sh local 2 2 2 1
