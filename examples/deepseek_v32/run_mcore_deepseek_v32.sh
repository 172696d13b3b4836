#!/bin/bash
# DeepSeek-V3.2 (DSA sparse attention) long-sequence pretraining on megatron-core, with Pai-Megatron-Patch's
# positional arguments (the 27 of examples/common/pai_args.sh, same order as examples/deepseek_v3's launcher).
# Seed 004 trains at 32K tokens with context parallelism: SEQ_LEN `default` is 32768 here, CP splits each
# sequence over CP ranks (2 x CP load-balanced chunks), CP_COMM_TYPE=p2p|all_gather (default all_gather)
# picks how K/V travel (Megatron-LM's --cp-comm-type; a2a is refused).
# MODEL_SIZE: A37B (the published DeepSeek-V3.2 config, 61 layers), tiny (a random make-mini config of the
# family, for tests), mini (the config of PRETRAIN_CHECKPOINT_PATH), or any name with HF_CONFIG_DIR set.
# V32_FAMILY overrides the model family (default deepseek_v32; deepseek_v3 is a stand-in with the same
# MLA + MoE layers and no indexer). Example, a tiny model on 4 CPU ranks (CP4, ring), 1024-token sequences:
#   megatron-patch make-mini --family deepseek_v32 --out /tmp/ds32
#   megatron-patch preprocess --input examples/data/corpus.txt --tokenizer /tmp/ds32 --output-prefix /tmp/corpus --append-eod
#   CP_COMM_TYPE=p2p bash examples/deepseek_v32/run_mcore_deepseek_v32.sh local mini 1 4 3e-3 3e-4 1024 1024 fp32 \
#       1 1 4 1 1 false false false false none false 10 /tmp/corpus none /tmp/ds32 40960 0 /tmp/ds32-run
# Seed 004's run (64 cards, 32K tokens): ... A37B 1 ... default default bf16 TP PP CP ETP EP ... as the cluster allows.
set -euo pipefail
FAMILY=${V32_FAMILY:-deepseek_v32} MOE=true MLA=true SIZES="A37B=61" DEFAULT_SEQ_LEN=32768
source "$(dirname "${BASH_SOURCE[0]}")/../common/pai_args.sh"
pai_launch "$@"
