#!/usr/bin/env bash
# HF <-> Megatron checkpoint conversion with Pai-Megatron-Patch's positional convention:
#
#   hf2mcore.sh MODEL_SIZE SRC DST TP PP ETP EP PR MG2HF [HF_CKPT_PATH] [extra flags...]
#
#   MG2HF=false  SRC = HF model dir -> DST = Megatron checkpoint (torch format, iteration "release")
#                at TPxPPxEPxETP; MODEL_SIZE (e.g. 16B, A2.4B, mini) is checked against the weights
#                when it holds a number; PR = fp32|bf16|fp16 (parameter dtype).
#   MG2HF=true   SRC = Megatron checkpoint -> DST = HF model dir; HF_CKPT_PATH = the original HF dir
#                (tokenizer files; config.json if the checkpoint has no hf_config/). The layout is read
#                from the checkpoint (TP/PP/ETP/EP are ignored); PR = dtype of the HF tensors.
#   extra flags go to the command (e.g. --force, --verify, --format torch_dist, --vpp 2).
#
# Runs `megatron-patch convert ...` ($PYTHON -m megatron_patch.cli when PYTHON is set).
set -euo pipefail

if [ "$#" -lt 9 ]; then
    sed -n '2,16p' "$0" >&2
    exit 2
fi
MODEL_SIZE=$1; SRC=$2; DST=$3; TP=$4; PP=$5; ETP=$6; EP=$7; PR=$8; MG2HF=$9
HF_CKPT_PATH=${10:-}
shift $(( $# >= 10 ? 10 : 9 ))

source "$(dirname "${BASH_SOURCE[0]}")/_megatron_patch_cmd.sh"

case "$MG2HF" in
    true|True|1|yes)
        exec "${MP[@]}" convert mcore2hf --mcore-path "$SRC" --out "$DST" --dtype "$PR" \
            ${HF_CKPT_PATH:+--hf-config "$HF_CKPT_PATH"} "$@"
        ;;
    false|False|0|no)
        exec "${MP[@]}" convert hf2mcore --hf-path "$SRC" --out "$DST" --tp "$TP" --pp "$PP" --ep "$EP" \
            --etp "$ETP" --dtype "$PR" --model-size "$MODEL_SIZE" "$@"
        ;;
    *)
        echo "error: MG2HF must be true or false, got '$MG2HF'" >&2
        exit 2
        ;;
esac
