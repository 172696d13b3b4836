# Shared body of examples/<family>/run_mcore_<family>.sh: Pai-Megatron-Patch's positional launch
# arguments -> `python -m megatron_patch.training.pretrain` under torchrun. Sourced, not run: the family
# script sets FAMILY, MOE (true|false), MLA (true|false) and SIZES (MODEL_SIZE=LAYERS of the family's
# published config, written with `make-mini --preset real-config`), optionally DEFAULT_SEQ_LEN (what
# SEQ_LEN / PAD_LEN `default` mean), then calls `pai_launch "$@"`.
#
#   run_mcore_<family>.sh ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR \
#       TP PP CP ETP EP SP DO FL SFT AC OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH \
#       PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH
#
#   ENV                  dsw (one node, localhost) | local (one node unless NNODES/NODE_RANK/MASTER_ADDR
#                        are set) | dlc (PAI-DLC: WORLD_SIZE nodes, this is node RANK, MASTER_ADDR/PORT
#                        given) | npu (as local, plus the HCCL settings of megatron_patch.runtime.settings)
#   MODEL_SIZE           a size with a built-in config (see the family script), `mini` (the config of
#                        PRETRAIN_CHECKPOINT_PATH, e.g. a make-mini output), `tiny` (a random make-mini config
#                        of the family, written under OUTPUT_BASEPATH), or any name with HF_CONFIG_DIR set
#   BATCH_SIZE           micro batch size;  GLOBAL_BATCH_SIZE: global batch size
#   PAD_LEN              not used (SFT samples are cut/padded to SEQ_LEN): any number
#   PR                   fp32 | bf16 | fp16 (dynamic loss scaling, fp32 master weights)
#   TP PP EP ETP         tensor / pipeline / expert / expert-tensor parallel sizes
#   CP                   context parallel size (SEQ_LEN divisible by 2 x CP); CP_COMM_TYPE=all_gather (default) |
#                        p2p (ring: a rank holds two K/V blocks, not the whole sequence's)
#   SP DO                sequence parallel, distributed optimizer: true | false
#   FL                   false (true is refused: no flash-attn path; the runtime picks attention kernels)
#   SFT                  true: supervised fine-tuning (`--sft`: DATASET_PATH from `megatron-patch preprocess --sft`,
#                        loss on the answer tokens); EXTRA_ARGS adds e.g. "--curriculum --curriculum-seed 42"
#   AC: none | sel | full;  OPTIMIZER_OFFLOAD: false
#   SAVE_INTERVAL        iterations between checkpoints
#   DATASET_PATH         Megatron .bin/.idx prefix (megatron-patch preprocess);  VALID_DATASET_PATH: prefix | none
#   PRETRAIN_CHECKPOINT_PATH  HF model dir (safetensors) | Megatron checkpoint dir | none (random init)
#   TRAIN_TOKENS WARMUP_TOKENS  -> --train-iters / --lr-warmup-iters = tokens / GLOBAL_BATCH_SIZE / SEQ_LEN
#   OUTPUT_BASEPATH      checkpoint/, tensorboard/, log/ go here; re-running the same command resumes
#
# Environment: PY (python, default <repo>/.venv/bin/python or python3), GPUS_PER_NODE or NPROC (processes
# per node; default: the detected device count, on CPU the smallest world the layout needs), MASTER_ADDR,
# MASTER_PORT, NNODES, NODE_RANK, HF_CONFIG_DIR, MP_AC_LAYERS (recompute layers for AC=full, default 1),
# EXTRA_ARGS (appended to the trainer's flags, e.g. "--log-interval 10 --exit-interval 1000"), DRY_RUN=1
# (print the torchrun command and stop), PRESET (below).
#
# PRESET=conservative|standard: seed 003's two named settings; they replace BATCH_SIZE, GLOBAL_BATCH_SIZE,
# LR/MIN_LR and TRAIN_TOKENS (the other arguments stay as given; the model's depth is the checkpoint's):
#                      conservative (first run)        standard
#   micro batch        2                               4
#   global batch       32768 tokens (/ SEQ_LEN)        65536 tokens (/ SEQ_LEN)
#   learning rate      0.7 x LR, 0.7 x MIN_LR          LR, MIN_LR
#   steps              500                             1000
#   allocator          max_split_size_mb:32            default
#
# Uneven pipeline stages (DeepSeek-V3's 61 layers, V2-Lite's 27), Megatron-LM's flags: FIRST_PP_LAYERS=N
# (--decoder-first-pipeline-num-layers; Pai's MP_PP0_LAYERS is read too), LAST_PP_LAYERS=N
# (--decoder-last-pipeline-num-layers), PP_LAYOUT=STR (--pipeline-model-parallel-layout, e.g.
# "Et|(tt|)*30mL" at PP=8: VPP follows from it). Plan a split first: megatron-patch convert hf2mcore
# --hf-path DIR --out X --pp N --decoder-first-pipeline-num-layers F --dry-run (lists each rank's layers).

pai_fail() {
    echo "error: $*" >&2
    exit 2
}

pai_int() {  # NAME VALUE [MIN]
    [[ "$2" =~ ^[0-9]+$ ]] || pai_fail "$1=$2: expected a whole number"
    (( $2 >= ${3:-0} )) || pai_fail "$1=$2: must be >= ${3:-0}"
}

pai_bool() {
    [[ "$2" == true || "$2" == false ]] || pai_fail "$1=$2: expected true or false"
}

pai_prefix() {  # NAME PREFIX: a Megatron indexed dataset
    [[ -f "$2.bin" && -f "$2.idx" ]] || pai_fail "$1=$2: $2.bin / $2.idx not found (make them with megatron-patch preprocess)"
}

pai_preset() {  # sets pai_launch's BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR TRAIN_TOKENS (dynamic scope)
    local micro tokens scale steps
    case "$1" in
        conservative) micro=2; tokens=32768; scale=0.7; steps=500
                      export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-max_split_size_mb:32}
                      export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-max_split_size_mb:32} ;;
        standard) micro=4; tokens=65536; scale=1; steps=1000 ;;
        *) pai_fail "PRESET=$1: expected conservative or standard" ;;
    esac
    pai_int SEQ_LEN "$SEQ_LEN" 2
    (( tokens % SEQ_LEN == 0 )) || pai_fail "PRESET=$1: SEQ_LEN=$SEQ_LEN must divide the preset's $tokens tokens per step"
    BATCH_SIZE=$micro
    GLOBAL_BATCH_SIZE=$(( tokens / SEQ_LEN ))
    if [[ "$scale" != 1 ]]; then
        LR=$(awk -v x="$LR" -v s="$scale" 'BEGIN { printf "%g", x * s }')
        MIN_LR=$(awk -v x="$MIN_LR" -v s="$scale" 'BEGIN { printf "%g", x * s }')
    fi
    TRAIN_TOKENS=$(( steps * tokens ))
    echo "PRESET=$1: micro batch $BATCH_SIZE, global batch $GLOBAL_BATCH_SIZE x $SEQ_LEN tokens, LR $LR (min $MIN_LR), $steps steps"
}

pai_lcm() {
    local a=$1 b=$2 x=$1 y=$2
    while (( y )); do local t=$((x % y)); x=$y; y=$t; done
    echo $((a / x * b))
}

pai_launch() {
    if (( $# != 27 )); then
        sed -n '/^#   run_mcore/,/^#   OUTPUT_BASEPATH/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
        pai_fail "expected 27 positional arguments, got $#"
    fi
    local ENV=$1 MODEL_SIZE=$2 BATCH_SIZE=$3 GLOBAL_BATCH_SIZE=$4 LR=$5 MIN_LR=$6 SEQ_LEN=$7 PAD_LEN=$8 PR=$9
    local TP=${10} PP=${11} CP=${12} ETP=${13} EP=${14} SP=${15} DO=${16} FL=${17} SFT=${18} AC=${19}
    local OPTIMIZER_OFFLOAD=${20} SAVE_INTERVAL=${21} DATASET_PATH=${22} VALID_DATASET_PATH=${23}
    local PRETRAIN_CHECKPOINT_PATH=${24} TRAIN_TOKENS=${25} WARMUP_TOKENS=${26} OUTPUT_BASEPATH=${27}
    if [[ -n "${DEFAULT_SEQ_LEN:-}" ]]; then
        [[ "$SEQ_LEN" == default ]] && SEQ_LEN=$DEFAULT_SEQ_LEN
        [[ "$PAD_LEN" == default ]] && PAD_LEN=$DEFAULT_SEQ_LEN
    fi
    [[ -z "${PRESET:-}" ]] || pai_preset "$PRESET"
    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    local PY=${PY:-}
    if [[ -z "$PY" ]]; then
        if [[ -x "$repo/.venv/bin/python" ]]; then PY="$repo/.venv/bin/python"; else PY=python3; fi
    fi

    # --- validate: every refusal names the argument ---------------------------------------------------
    case "$ENV" in dsw|dlc|local|npu) ;; *) pai_fail "ENV=$ENV: expected dsw, dlc, local or npu" ;; esac
    pai_int BATCH_SIZE "$BATCH_SIZE" 1
    pai_int GLOBAL_BATCH_SIZE "$GLOBAL_BATCH_SIZE" 1
    pai_int SEQ_LEN "$SEQ_LEN" 2
    pai_int PAD_LEN "$PAD_LEN"
    for v in TP PP CP ETP EP; do pai_int "$v" "${!v}" 1; done
    pai_int SAVE_INTERVAL "$SAVE_INTERVAL" 1
    pai_int TRAIN_TOKENS "$TRAIN_TOKENS" 1
    pai_int WARMUP_TOKENS "$WARMUP_TOKENS"
    for v in SP DO SFT; do pai_bool "$v" "${!v}"; done
    case "$PR" in
        fp32|bf16|fp16) ;;
        fp8) pai_fail "PR=$PR is not supported (no FP8 recipe here); use bf16, fp16 or fp32" ;;
        *) pai_fail "PR=$PR: expected fp32, bf16 or fp16" ;;
    esac
    local cp_args=()
    if (( CP > 1 )); then
        case "${CP_COMM_TYPE:=all_gather}" in
            p2p|all_gather) cp_args=(--cp-comm-type "$CP_COMM_TYPE") ;;
            *) pai_fail "CP_COMM_TYPE=$CP_COMM_TYPE: expected p2p or all_gather (a2a needs Transformer Engine's attention)" ;;
        esac
    fi
    (( SEQ_LEN % (2 * CP) == 0 )) || pai_fail "CP=$CP: SEQ_LEN=$SEQ_LEN must be divisible by 2 x CP (each CP rank holds two chunks); change SEQ_LEN or CP"
    [[ "$OPTIMIZER_OFFLOAD" == false ]] || pai_fail "OPTIMIZER_OFFLOAD=$OPTIMIZER_OFFLOAD: optimizer offload is not supported; use false"
    case "$FL" in
        false) ;;
        true)
            [[ "$MLA" == true ]] && pai_fail "FL=true: MLA attention has no flash-attn path; set FL=false"
            "$PY" -c "import flash_attn" 2>/dev/null || pai_fail "FL=true: flash-attn is not installed; set FL=false (the runtime picks the attention kernel per device)"
            echo "note: FL=true: flash-attn found; attention kernels are chosen by the runtime per device" ;;
        *) pai_fail "FL=$FL: expected true or false" ;;
    esac
    local ac_args=()
    case "$AC" in
        none) ;;
        sel) ac_args=(--recompute-granularity selective) ;;
        full) ac_args=(--recompute-granularity full --recompute-method uniform --recompute-num-layers "${MP_AC_LAYERS:-1}") ;;
        offload) pai_fail "AC=offload: activation offloading is not supported; use none, sel or full" ;;
        *) pai_fail "AC=$AC: expected none, sel or full" ;;
    esac
    if [[ "$MOE" != true ]] && (( EP > 1 || ETP > 1 )); then
        pai_fail "EP=$EP ETP=$ETP: $FAMILY is a dense model; use EP=1 ETP=1"
    fi
    pai_prefix DATASET_PATH "$DATASET_PATH"
    local sft_args=() kind=pretrain
    if [[ "$SFT" == true ]]; then
        [[ -f "$DATASET_PATH.sft.json" ]] || pai_fail "SFT=true: DATASET_PATH=$DATASET_PATH is not SFT data (no $DATASET_PATH.sft.json; make it with megatron-patch preprocess --sft)"
        [[ "$VALID_DATASET_PATH" == none ]] || pai_fail "SFT=true: VALID_DATASET_PATH is not supported with SFT yet; use none"
        sft_args=(--sft); kind=finetune
    fi
    local valid_args=()
    if [[ "$VALID_DATASET_PATH" != none ]]; then
        pai_prefix VALID_DATASET_PATH "$VALID_DATASET_PATH"
        valid_args=(--valid-data-path "$VALID_DATASET_PATH" --eval-interval "${EVAL_INTERVAL:-$SAVE_INTERVAL}" --eval-iters "${EVAL_ITERS:-10}")
    fi
    local TRAIN_ITERS=$(( TRAIN_TOKENS / GLOBAL_BATCH_SIZE / SEQ_LEN ))
    local WARMUP_ITERS=$(( WARMUP_TOKENS / GLOBAL_BATCH_SIZE / SEQ_LEN ))
    (( TRAIN_ITERS >= 1 )) || pai_fail "TRAIN_TOKENS=$TRAIN_TOKENS is less than one global batch (GLOBAL_BATCH_SIZE x SEQ_LEN = $((GLOBAL_BATCH_SIZE * SEQ_LEN)) tokens)"
    (( WARMUP_ITERS < TRAIN_ITERS )) || pai_fail "WARMUP_TOKENS=$WARMUP_TOKENS: warm-up ($WARMUP_ITERS iterations) must be shorter than training ($TRAIN_ITERS)"

    # --- model config and initial weights -------------------------------------------------------------
    local init_args=() hf_config=""
    if [[ "$PRETRAIN_CHECKPOINT_PATH" != none ]]; then
        [[ -d "$PRETRAIN_CHECKPOINT_PATH" ]] || pai_fail "PRETRAIN_CHECKPOINT_PATH=$PRETRAIN_CHECKPOINT_PATH: not a directory"
        if [[ -f "$PRETRAIN_CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ]]; then
            init_args=(--load "$PRETRAIN_CHECKPOINT_PATH")
            [[ -f "$PRETRAIN_CHECKPOINT_PATH/hf_config/config.json" ]] && hf_config="$PRETRAIN_CHECKPOINT_PATH/hf_config"
        elif compgen -G "$PRETRAIN_CHECKPOINT_PATH/*.safetensors" >/dev/null; then
            init_args=(--load-hf "$PRETRAIN_CHECKPOINT_PATH")
            hf_config="$PRETRAIN_CHECKPOINT_PATH"
        else
            pai_fail "PRETRAIN_CHECKPOINT_PATH=$PRETRAIN_CHECKPOINT_PATH holds neither a Megatron checkpoint (latest_checkpointed_iteration.txt) nor HF safetensors"
        fi
    fi
    if [[ -n "${HF_CONFIG_DIR:-}" ]]; then
        hf_config="$HF_CONFIG_DIR"
    elif [[ "$MODEL_SIZE" == tiny ]]; then
        hf_config="$OUTPUT_BASEPATH/hf_config/$FAMILY-tiny"
        if [[ ! -f "$hf_config/config.json" ]]; then
            local out
            out=$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$PY" -W ignore -m megatron_patch.cli make-mini \
                  --family "$FAMILY" --out "$hf_config" 2>&1) \
                || pai_fail "MODEL_SIZE=tiny: could not write a tiny $FAMILY config: $out"
        fi
    elif [[ "$MODEL_SIZE" == mini ]]; then
        [[ -n "$hf_config" && -f "$hf_config/config.json" ]] || pai_fail "MODEL_SIZE=mini takes the config from PRETRAIN_CHECKPOINT_PATH, which has no config.json (give a make-mini output, or set HF_CONFIG_DIR)"
    else
        local layers="" entry
        for entry in $SIZES; do [[ "${entry%%=*}" == "$MODEL_SIZE" ]] && layers="${entry#*=}"; done
        [[ -n "$layers" ]] || pai_fail "MODEL_SIZE=$MODEL_SIZE: no built-in $FAMILY config (known: mini tiny ${SIZES//=[0-9]*/}); set HF_CONFIG_DIR to the model's HF directory"
        hf_config="$OUTPUT_BASEPATH/hf_config/$FAMILY-$MODEL_SIZE"
        if [[ ! -f "$hf_config/config.json" ]]; then
            local out
            out=$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$PY" -W ignore -m megatron_patch.cli make-mini \
                  --family "$FAMILY" --preset real-config --layers "$layers" --out "$hf_config" 2>&1) \
                || pai_fail "MODEL_SIZE=$MODEL_SIZE: could not write the $FAMILY config: $out"
        fi
    fi
    [[ -f "$hf_config/config.json" ]] || pai_fail "MODEL_SIZE=$MODEL_SIZE: $hf_config/config.json not found"

    # --- launch environment ---------------------------------------------------------------------------
    local NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-localhost}
    local MASTER_PORT=${MASTER_PORT:-$(shuf -n 1 -i 10000-65535)}
    case "$ENV" in
        dsw) NNODES=1; NODE_RANK=0; MASTER_ADDR=localhost ;;
        dlc) NNODES=${WORLD_SIZE:?ENV=dlc needs WORLD_SIZE (number of nodes)}
             NODE_RANK=${RANK:?ENV=dlc needs RANK (this node)}
             MASTER_ADDR=${MASTER_ADDR:?ENV=dlc needs MASTER_ADDR}; MASTER_PORT=${MASTER_PORT:?ENV=dlc needs MASTER_PORT} ;;
        npu) export MP_DEVICE=npu
             eval "$("$PY" -c 'from megatron_patch.runtime.settings import settings_for
for k, v in settings_for("npu").env_defaults.items(): print(f"export {k}=${{{k}:-{v}}}")')" ;;
    esac
    local nproc=${GPUS_PER_NODE:-${NPROC:-}} device_type device_count
    if [[ -z "$nproc" ]]; then
        read -r device_type device_count < <(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
from megatron_patch.runtime.accelerator import get_accelerator as g
a = g(); print(a.type, a.device_count())' 2>/dev/null || echo "unknown 0")
        if [[ "$device_type" == cpu ]]; then
            nproc=$(pai_lcm $((TP * PP * CP)) $((ETP * EP * PP)))  # the smallest world this layout needs
        elif [[ "$device_type" == unknown || "$device_count" == 0 ]]; then
            pai_fail "ENV=$ENV: no usable device found (MP_DEVICE=${MP_DEVICE:-auto}); set GPUS_PER_NODE"
        else
            nproc=$device_count
        fi
    fi
    pai_int GPUS_PER_NODE "$nproc" 1

    # --- outputs: the checkpoint directory has no timestamp, so the same command resumes ------------
    local NAME="$kind-mcore-$FAMILY-$MODEL_SIZE-lr-$LR-minlr-$MIN_LR-bs-$BATCH_SIZE-gbs-$GLOBAL_BATCH_SIZE-seqlen-$SEQ_LEN-pr-$PR-tp-$TP-pp-$PP-ep-$EP-etp-$ETP-ac-$AC-do-$DO-sp-$SP-ti-$TRAIN_ITERS-wi-$WARMUP_ITERS"
    local stamp
    stamp=$(date "+%Y.%m.%d-%H.%M.%S")
    local save_dir="$OUTPUT_BASEPATH/checkpoint/$NAME" tb_dir="$OUTPUT_BASEPATH/tensorboard/${NAME}_$stamp"
    local log_file="$OUTPUT_BASEPATH/log/${NAME}_$stamp.log"
    mkdir -p "$save_dir" "$tb_dir" "$OUTPUT_BASEPATH/log"

    local args=(
        --hf-config "$hf_config" "${init_args[@]}" --save "$save_dir" --save-interval "$SAVE_INTERVAL"
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
        --expert-model-parallel-size "$EP" --expert-tensor-parallel-size "$ETP" --context-parallel-size "$CP" "${cp_args[@]}"
        --micro-batch-size "$BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE" --seq-length "$SEQ_LEN"
        --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$WARMUP_ITERS"
        --train-iters "$TRAIN_ITERS" --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
        --data-path "$DATASET_PATH" --data-cache-path "$OUTPUT_BASEPATH/data_cache" "${valid_args[@]}"
        --tensorboard-dir "$tb_dir" --log-interval 1 "${ac_args[@]}" "${sft_args[@]}"
    )
    [[ "$PR" == bf16 ]] && args+=(--bf16)
    [[ "$PR" == fp16 ]] && args+=(--fp16)
    [[ "$SP" == true ]] && (( TP > 1 )) && args+=(--sequence-parallel)
    [[ "$DO" == true ]] && args+=(--use-distributed-optimizer)
    local first_pp=${FIRST_PP_LAYERS:-${MP_PP0_LAYERS:-}} last_pp=${LAST_PP_LAYERS:-}
    if [[ -n "$first_pp" ]]; then pai_int FIRST_PP_LAYERS "$first_pp" 1; args+=(--decoder-first-pipeline-num-layers "$first_pp"); fi
    if [[ -n "$last_pp" ]]; then pai_int LAST_PP_LAYERS "$last_pp" 1; args+=(--decoder-last-pipeline-num-layers "$last_pp"); fi
    [[ -n "${PP_LAYOUT:-}" ]] && args+=(--pipeline-model-parallel-layout "$PP_LAYOUT")
    # shellcheck disable=SC2206 - EXTRA_ARGS is a flag list by design
    args+=(${EXTRA_ARGS:-})

    local cmd=("$PY" -m torch.distributed.run --nproc_per_node "$nproc" --nnodes "$NNODES" --node_rank "$NODE_RANK"
               --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m megatron_patch.training.pretrain "${args[@]}")
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "${cmd[@]}"; echo
        return 0
    fi
    echo "${cmd[*]}" | tee "$log_file"
    set -o pipefail
    # torchrun exits 1 whatever went wrong: the ranks write their own codes (2 bad input, 3 NaN stop / hung rank)
    local status_file="$log_file.exit-status"
    rm -f "$status_file"
    local rc=0
    MP_EXIT_STATUS_FILE="$status_file" PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "${cmd[@]}" 2>&1 \
        | tee -a "$log_file" || rc=$?
    if (( rc != 0 )) && [[ -s "$status_file" ]]; then
        rc=$(awk '$2 > m {m = $2} END {print m}' "$status_file")
    fi
    rm -f "$status_file"
    return "$rc"
}
