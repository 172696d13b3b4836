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

if [ -n "${PYTHON:-}" ]; then
    MP=("$PYTHON" -m megatron_patch.cli)
elif command -v megatron-patch >/dev/null 2>&1; then
    MP=(megatron-patch)
else
    MP=(python3 -m megatron_patch.cli)
fi
exec "${MP[@]}" convert mcore2hf --mcore-path "$MCORE" --out "$OUT" ${HF_CONFIG:+--hf-config "$HF_CONFIG"} \
    ${PR:+--dtype "$PR"} "$@"
