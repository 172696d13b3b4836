#!/bin/bash
# Qwen3-MoE pretraining on megatron-core, with Pai-Megatron-Patch's positional arguments (the 27 of
# examples/common/pai_args.sh). MODEL_SIZE: A3B (the published Qwen3-30B-A3B config, 48 layers), mini
# (the config of PRETRAIN_CHECKPOINT_PATH, e.g. a make-mini output), or any name with HF_CONFIG_DIR set.
set -euo pipefail
FAMILY=qwen3_moe MOE=true MLA=false SIZES="A3B=48"
source "$(dirname "${BASH_SOURCE[0]}")/../common/pai_args.sh"
pai_launch "$@"
