#!/bin/bash
# Qwen2 / Qwen2.5 (dense) pretraining on megatron-core, with Pai-Megatron-Patch's positional arguments
# (the 27 of examples/common/pai_args.sh; EP and ETP must be 1). MODEL_SIZE: 32B (the published
# Qwen2.5-32B config, 64 layers), mini (the config of PRETRAIN_CHECKPOINT_PATH, e.g. a make-mini output),
# or any name with HF_CONFIG_DIR set (e.g. Qwen2.5-7B's HF directory).
set -euo pipefail
FAMILY=qwen2 MOE=false MLA=false SIZES="32B=64"
source "$(dirname "${BASH_SOURCE[0]}")/../common/pai_args.sh"
pai_launch "$@"
