#!/usr/bin/env bash
# Mini DeepSeek-V3 (MLA + MoE with shared experts, sigmoid group-limited routing with expert bias, YaRN,
# first layer dense, MTP): HF -> Megatron at a TP/PP/EP layout, then a hook-by-hook activation comparison
# against the HF model. Runs as it is on a CPU box (gloo ranks); no download.
#
#   bash examples/deepseek_v3/run_mini_deepseek_test.sh [ENV] [TP] [PP] [EP] [ETP]
#     ENV          local (default) | dsw: only selects defaults (work dir, batch size, sequence length)
#     TP PP EP ETP default 2 2 2 1: TP, PP and EP together on 4 ranks (experts split over the TP ranks)
#   environment: PY (default <repo>/.venv/bin/python), WORK_DIR, BATCH_SIZE, SEQ_LENGTH, DTYPE (fp32|bf16),
#                VPP, FORMAT (torch|torch_dist, for hf2mcore), SEED
# Exit status: 0 PASS, 1 FAIL, 2 bad input. The report is also written to $WORK_DIR/report.{json,png}.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TORCHDYNAMO_DISABLE="${TORCHDYNAMO_DISABLE:-1}"  # megatron's jit_fuser = torch.compile: slow on CPU, same numbers
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

ENV_NAME="${1:-local}"
TP="${2:-2}"; PP="${3:-2}"; EP="${4:-2}"; ETP="${5:-1}"
case "$ENV_NAME" in
  local) DEF_DIR="${TMPDIR:-/tmp}/megatron_patch_mini_ds3"; DEF_BATCH=2; DEF_SEQ=32 ;;
  dsw)   if [ -d /mnt/workspace ] && [ -w /mnt/workspace ]; then DEF_DIR=/mnt/workspace/megatron_patch_mini_ds3
         else DEF_DIR="${TMPDIR:-/tmp}/megatron_patch_mini_ds3"; fi
         DEF_BATCH=4; DEF_SEQ=128 ;;
  -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
  *) echo "usage: $0 [local|dsw] [TP] [PP] [EP] [ETP]  (got ENV=$ENV_NAME)" >&2; exit 2 ;;
esac
WORK_DIR="${WORK_DIR:-$DEF_DIR}"
BATCH_SIZE="${BATCH_SIZE:-$DEF_BATCH}"
SEQ_LENGTH="${SEQ_LENGTH:-$DEF_SEQ}"
DTYPE="${DTYPE:-fp32}"
FORMAT="${FORMAT:-torch}"
SEED="${SEED:-1234}"
VPP_ARGS=()
if [ -n "${VPP:-}" ] && [ "${VPP}" -gt 1 ]; then VPP_ARGS=(--vpp "$VPP"); fi
MP=("$PY" -m megatron_patch.cli)
HF_DIR="$WORK_DIR/hf"
LAYOUT_NAME="tp${TP}_pp${PP}_ep${EP}_etp${ETP}${VPP:+_vpp$VPP}"
START=$SECONDS

echo "===== Testing TP=$TP, PP=$PP, EP=$EP, ETP=$ETP${VPP:+, VPP=$VPP} ($ENV_NAME) ====="
mkdir -p "$WORK_DIR"

echo "--- 1/3 make-mini: tiny random DeepSeek-V3 (HF safetensors + tokenizer) -> $HF_DIR"
"${MP[@]}" make-mini --family deepseek_v3 --out "$HF_DIR" --seed 0 --force
"$PY" - "$HF_DIR" <<'PYEOF'
import json, sys
c = json.load(open(f"{sys.argv[1]}/config.json"))
print(f"  layers {c['num_hidden_layers']} (first {c['first_k_dense_replace']} dense), hidden {c['hidden_size']}, "
      f"heads {c['num_attention_heads']}, q_lora {c['q_lora_rank']}, kv_lora {c['kv_lora_rank']}, "
      f"experts {c['n_routed_experts']} (top-{c['num_experts_per_tok']}, {c['n_group']} groups) + "
      f"{c['n_shared_experts']} shared, vocab {c['vocab_size']}, MTP {c.get('num_nextn_predict_layers', 0)}")
PYEOF

MCORE_ARGS=()
if "${MP[@]}" convert hf2mcore --help >/dev/null 2>&1; then
  MCORE_DIR="$WORK_DIR/mcore_${LAYOUT_NAME}_${FORMAT}"
  echo "--- 2/3 convert hf2mcore ($FORMAT) -> $MCORE_DIR"
  "${MP[@]}" convert hf2mcore --hf-path "$HF_DIR" --out "$MCORE_DIR" --tp "$TP" --pp "$PP" --ep "$EP" \
      --etp "$ETP" "${VPP_ARGS[@]}" --format "$FORMAT" --force
  MCORE_ARGS=(--mcore-path "$MCORE_DIR")
else
  echo "--- 2/3 no 'convert hf2mcore' in this checkout: the comparison converts in memory"
fi

echo "--- 3/3 compare: Megatron (TP=$TP PP=$PP EP=$EP ETP=$ETP) vs HF, batch $BATCH_SIZE x seq $SEQ_LENGTH, $DTYPE"
set +e
"${MP[@]}" compare --hf-path "$HF_DIR" "${MCORE_ARGS[@]}" --tp "$TP" --pp "$PP" --ep "$EP" --etp "$ETP" \
    "${VPP_ARGS[@]}" --batch-size "$BATCH_SIZE" --seq-length "$SEQ_LENGTH" --dtype "$DTYPE" --seed "$SEED" \
    --json "$WORK_DIR/report_${LAYOUT_NAME}.json" --plot "$WORK_DIR/report_${LAYOUT_NAME}.png"
RC=$?
set -e
echo "(${LAYOUT_NAME}: $((SECONDS - START)) s)"
exit $RC
