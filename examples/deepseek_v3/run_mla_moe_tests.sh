#!/usr/bin/env bash
# The MLA + MoE layout matrix: mini DeepSeek-V2-Lite and DeepSeek-V3 models compared with HF, hook point by
# hook point, at TP1/PP1, TP2, PP2, EP2, TP2xEP2, PP2xEP2 and PP2xVPP2 (at most 4 gloo ranks on CPU).
# A summary table at the end; exit 1 if any layout FAILs.
#
#   bash examples/deepseek_v3/run_mla_moe_tests.sh [FAMILIES...]     (default: deepseek_v2 deepseek_v3)
#   environment: PY (default <repo>/.venv/bin/python), WORK_DIR, DTYPE (fp32|bf16), BATCH_SIZE, SEQ_LENGTH,
#                CONVERT=1 to go through `convert hf2mcore` (torch format) for every layout instead of
#                converting in memory, LAYOUTS="TP,PP,EP,ETP[,VPP] ..." to pick layouts
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TORCHDYNAMO_DISABLE="${TORCHDYNAMO_DISABLE:-1}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
WORK_DIR="${WORK_DIR:-${TMPDIR:-/tmp}/megatron_patch_mla_moe_tests}"
DTYPE="${DTYPE:-fp32}"
BATCH_SIZE="${BATCH_SIZE:-2}"
SEQ_LENGTH="${SEQ_LENGTH:-32}"
CONVERT="${CONVERT:-0}"
FAMILIES=("$@")
[ ${#FAMILIES[@]} -eq 0 ] && FAMILIES=(deepseek_v2 deepseek_v3)
# TP,PP,EP,ETP[,VPP]
LAYOUTS=(${LAYOUTS:-1,1,1,1 2,1,1,2 1,2,1,1 1,1,2,1 2,1,2,1 1,2,2,1 1,2,1,1,2})
MP=("$PY" -m megatron_patch.cli)
mkdir -p "$WORK_DIR"
SUMMARY="$WORK_DIR/summary.tsv"
: > "$SUMMARY"
FAILED=0
START_ALL=$SECONDS

for FAMILY in "${FAMILIES[@]}"; do
  HF_DIR="$WORK_DIR/$FAMILY"
  echo "===== $FAMILY: make-mini -> $HF_DIR ====="
  if ! "${MP[@]}" make-mini --family "$FAMILY" --out "$HF_DIR" --seed 0 --force >/dev/null 2>"$WORK_DIR/make-mini.err"; then
    cat "$WORK_DIR/make-mini.err" >&2; exit 2
  fi
  for L in "${LAYOUTS[@]}"; do
    IFS=, read -r TP PP EP ETP VPP <<< "$L"
    NAME="TP${TP}xPP${PP}xEP${EP}xETP${ETP}${VPP:+xVPP$VPP}"
    EXTRA=()
    [ -n "${VPP:-}" ] && EXTRA+=(--vpp "$VPP")
    echo "===== $FAMILY $NAME ====="
    START=$SECONDS
    if [ "$CONVERT" = 1 ]; then
      MCORE="$WORK_DIR/mcore_${FAMILY}_$NAME"
      "${MP[@]}" convert hf2mcore --hf-path "$HF_DIR" --out "$MCORE" --tp "$TP" --pp "$PP" --ep "$EP" --etp "$ETP" \
          "${EXTRA[@]}" --force || { echo "hf2mcore failed"; }
      EXTRA+=(--mcore-path "$MCORE")
    fi
    JSON="$WORK_DIR/report_${FAMILY}_$NAME.json"
    rm -f "$JSON"
    "${MP[@]}" compare --hf-path "$HF_DIR" --tp "$TP" --pp "$PP" --ep "$EP" --etp "$ETP" "${EXTRA[@]}" \
        --dtype "$DTYPE" --batch-size "$BATCH_SIZE" --seq-length "$SEQ_LENGTH" --json "$JSON" \
        > "$WORK_DIR/log_${FAMILY}_$NAME.txt" 2>&1
    RC=$?
    SECS=$((SECONDS - START))
    if [ $RC -ne 0 ]; then FAILED=1; fi
    "$PY" - "$JSON" "$FAMILY" "$NAME" "$RC" "$SECS" "$WORK_DIR/log_${FAMILY}_$NAME.txt" >> "$SUMMARY" <<'PYEOF'
import json, os, sys
path, family, name, rc, secs, log = sys.argv[1:]
if not os.path.exists(path):
    tail = open(log).read().strip().splitlines()[-1:] or ["?"]
    print("\t".join([family, name, "ERROR", "-", "-", "-", f"{secs}s", tail[0][:60]]))
    sys.exit()
r = json.load(open(path))
worst = max(r["rows"], key=lambda x: float(x["max_abs"]))
where_worst = worst["component"] + ("" if worst["layer"] is None else f"/{worst['layer']}")
first = r["first_failure"]
where = "" if not first else f"first FAIL: {first['component']} layer {first['layer']}"
print("\t".join([family, name, r["result"], f"{float(r['logits']['max_abs']):.2e}",
                 f"{r['logits']['top1_agreement']:.0%}", f"{where_worst} {float(worst['max_abs']):.1e}",
                 f"{secs}s", where]))
PYEOF
    tail -n 1 "$SUMMARY" | awk -F'\t' '{printf "  %s  logits max diff %s  (%s)  %s\n", $3, $4, $7, $8}'
  done
done

echo
echo "============= Summary ($DTYPE, batch $BATCH_SIZE x seq $SEQ_LENGTH, $((SECONDS - START_ALL)) s) ============="
printf "%-12s %-24s %-6s %-14s %-7s %-28s %-6s %s\n" model layout result "logits diff" top-1 "worst hook (max diff)" time note
while IFS=$'\t' read -r F N R D T W S E; do
  printf "%-12s %-24s %-6s %-14s %-7s %-28s %-6s %s\n" "$F" "$N" "$R" "$D" "$T" "$W" "$S" "$E"
done < "$SUMMARY"
echo "============= Overall Result ============="
if [ $FAILED -eq 0 ]; then echo PASS; else echo FAIL; fi
echo "(logs and JSON reports in $WORK_DIR)"
exit $FAILED
