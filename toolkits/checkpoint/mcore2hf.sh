#!/usr/bin/env bash
# Megatron checkpoint (torch or torch_dist) -> HF safetensors.
#
#   mcore2hf.sh MCORE_PATH OUT [HF_CONFIG_DIR] [PR] [extra flags...]
#
#   HF_CONFIG_DIR: the original HF model dir (tokenizer files; config.json when the checkpoint has no
#   hf_config/); "" to skip. PR: fp32|bf16|fp16 (default: the checkpoint's dtype).
set -euo pipefail

if [ "$#" -lt 2 ]; then
    sed -n '2,8p' "$0" >&2
    exit 2
fi
MCORE=$1; OUT=$2; HF_CONFIG=${3:-}; PR=${4:-}
shift $(( $# >= 4 ? 4 : $# ))

source "$(dirname "${BASH_SOURCE[0]}")/_megatron_patch_cmd.sh"
exec "${MP[@]}" convert mcore2hf --mcore-path "$MCORE" --out "$OUT" ${HF_CONFIG:+--hf-config "$HF_CONFIG"} \
    ${PR:+--dtype "$PR"} "$@"
