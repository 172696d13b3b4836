#!/bin/bash
# DeepSeek-V3 pretraining on megatron-core, with Pai-Megatron-Patch's positional arguments (the 27 of
# examples/common/pai_args.sh). MODEL_SIZE: A37B (the published DeepSeek-V3 config, 61 layers), mini
# (the config of PRETRAIN_CHECKPOINT_PATH, e.g. `megatron-patch make-mini --family deepseek_v3`), or any
# name with HF_CONFIG_DIR set. Example, a tiny model on 4 CPU ranks (TP2 x PP2):
#   megatron-patch make-mini --family deepseek_v3 --out /tmp/ds3 --set num_nextn_predict_layers=0
#   megatron-patch preprocess --input examples/data/corpus.txt --tokenizer /tmp/ds3 --output-prefix /tmp/corpus --append-eod
#   bash examples/deepseek_v3/run_mcore_deepseek_v3.sh local mini 2 8 3e-3 3e-4 64 64 fp32 2 2 1 1 1 \
#       true false false false none false 10 /tmp/corpus none /tmp/ds3 10240 1024 /tmp/ds3-run
set -euo pipefail
FAMILY=deepseek_v3 MOE=true MLA=true SIZES="A37B=61"
source "$(dirname "${BASH_SOURCE[0]}")/../common/pai_args.sh"
pai_launch "$@"
