#!/usr/bin/env bash
# DeepSeek-V3 block-scaled FP8 HF checkpoint -> BF16 (run before hf2mcore.sh on the official weights).
#
#   fp8_to_bf16.sh IN_DIR OUT_DIR [--force]
set -euo pipefail

if [ "$#" -lt 2 ]; then
    sed -n '2,5p' "$0" >&2
    exit 2
fi
IN=$1; OUT=$2
shift 2

if [ -n "${PYTHON:-}" ]; then
    MP=("$PYTHON" -m megatron_patch.cli)
elif command -v megatron-patch >/dev/null 2>&1; then
    MP=(megatron-patch)
else
    MP=(python3 -m megatron_patch.cli)
fi
exec "${MP[@]}" convert fp8-to-bf16 --in "$IN" --out "$OUT" "$@"
