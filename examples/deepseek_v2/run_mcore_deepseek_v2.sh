#!/bin/bash
# DeepSeek-V2 / V2-Lite pretraining on megatron-core, with Pai-Megatron-Patch's positional arguments
# (the 27 of examples/common/pai_args.sh). MODEL_SIZE: A2.4B or 16B (the published DeepSeek-V2-Lite
# config, 27 layers), mini (the config of PRETRAIN_CHECKPOINT_PATH, e.g. a make-mini output), or any name
# with HF_CONFIG_DIR set (e.g. the full DeepSeek-V2's HF directory).
set -euo pipefail
FAMILY=deepseek_v2 MOE=true MLA=true SIZES="A2.4B=27 16B=27"
source "$(dirname "${BASH_SOURCE[0]}")/../common/pai_args.sh"
pai_launch "$@"
