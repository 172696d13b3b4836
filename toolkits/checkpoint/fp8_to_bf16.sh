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

source "$(dirname "${BASH_SOURCE[0]}")/_megatron_patch_cmd.sh"
exec "${MP[@]}" convert fp8-to-bf16 --in "$IN" --out "$OUT" "$@"
