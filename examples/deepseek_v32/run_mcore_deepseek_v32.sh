#!/bin/bash
# DeepSeek-V3.2 (DSA sparse attention) long-sequence pretraining on megatron-core, with Pai-Megatron-Patch's
# positional arguments (the 27 of examples/common/pai_args.sh, same order as examples/deepseek_v3's launcher).
# Seed 004 trains at 32K tokens with context parallelism: SEQ_LEN `default` is 32768 here, CP splits each
# sequence over CP ranks (2 x CP load-balanced chunks). DSA attention all-gathers K/V over CP (its indexer
# scores every earlier key), so CP_COMM_TYPE can only be all_gather here (the ring, p2p, serves MLA and GQA).
# MODEL_SIZE: A37B (the published DeepSeek-V3.2-Exp config, 61 layers), tiny (a random make-mini config of the
# family, for tests), mini (the config of PRETRAIN_CHECKPOINT_PATH), or any name with HF_CONFIG_DIR set.
# Example, a tiny model on 4 CPU ranks (CP4), 1024-token sequences:
#   megatron-patch make-mini --family deepseek_v32 --out /tmp/ds32
#   megatron-patch preprocess --input examples/data/corpus.txt --tokenizer /tmp/ds32 --output-prefix /tmp/corpus --append-eod
#   bash examples/deepseek_v32/run_mcore_deepseek_v32.sh local mini 1 4 3e-3 3e-4 1024 1024 fp32 \
#       1 1 4 1 1 false false false false none false 10 /tmp/corpus none /tmp/ds32 40960 0 /tmp/ds32-run
set -euo pipefail
FAMILY=deepseek_v32 MOE=true MLA=true SIZES="A37B=61" DEFAULT_SEQ_LEN=32768
source "$(dirname "${BASH_SOURCE[0]}")/../common/pai_args.sh"
[[ "${CP_COMM_TYPE:-all_gather}" == all_gather ]] \
    || pai_fail "CP_COMM_TYPE=$CP_COMM_TYPE: DeepSeek-V3.2's DSA attention gathers K/V over CP (its indexer scores every key); use all_gather"
pai_launch "$@"
