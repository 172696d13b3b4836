#!/usr/bin/env bash
# `make demo`: what this machine offers, then a tiny MLA + MoE model at TP2 x EP2 (4 gloo ranks)
# checked against the single-rank run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export TORCHDYNAMO_DISABLE=1 PYTHONWARNINGS=ignore
$PY -m megatron_patch.cli env-check
echo
$PY -m megatron_patch.testing.selfcheck --tp 2 --ep 2 --etp 1
