#!/usr/bin/env bash
# Seed 004's weight conversion, as its guide types it:
#
#   weight_convert.sh --input_fp8_hf_path IN_DIR --output_hf_path OUT_DIR --quant_mode bfloat16 [--force]
#
# The block-scaled FP8 HF checkpoint (DeepSeek-V3 / V3.2) -> BF16, onto `megatron-patch convert fp8-to-bf16`
# (streaming, written atomically). quant_mode: bfloat16 (the only mode; default). Bad input: exit 2.
set -euo pipefail

usage() { sed -n '2,7p' "$0" >&2; exit 2; }
IN=""; OUT=""; MODE=bfloat16; EXTRA=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --input_fp8_hf_path) IN=${2:-}; shift 2 || usage ;;
        --output_hf_path) OUT=${2:-}; shift 2 || usage ;;
        --quant_mode) MODE=${2:-}; shift 2 || usage ;;
        --input_fp8_hf_path=*) IN=${1#*=}; shift ;;
        --output_hf_path=*) OUT=${1#*=}; shift ;;
        --quant_mode=*) MODE=${1#*=}; shift ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
[ -n "$IN" ] && [ -n "$OUT" ] || { echo "error: --input_fp8_hf_path and --output_hf_path are required" >&2; usage; }
case "$MODE" in
    bfloat16|bf16) ;;
    *) echo "error: --quant_mode $MODE: only bfloat16 is supported (FP8 -> BF16)" >&2; exit 2 ;;
esac

source "$(dirname "${BASH_SOURCE[0]}")/_megatron_patch_cmd.sh"
exec "${MP[@]}" convert fp8-to-bf16 --in "$IN" --out "$OUT" "${EXTRA[@]}"
