#!/usr/bin/env bash
# One GPU run for the speed rows of docs/bench.md, each script comparing its variants side by side in one process:
#  1. the SD1.5-architecture DMD iteration (random weights, bf16) at batch 4 and 16, eager vs compiled: s/iteration,
#     TFLOP/iteration, MFU, peak memory (experiments/bench_sd15_step.py);
#  2. the same at batch 16 with CUDA graphs (compile mode reduce-overhead);
#  3. configs/fmnist.yaml at batch 256 + 256: eager, compiled, + TF32 + channels-last, + no per-update sync,
#     + CUDA graphs (experiments/fmnist_speed.py, on 2,048 pairs of the shipped teacher).
# Each step gets a share of the deadline and is cut off (its rows so far kept) when it runs over.
# At most 8 files go to $OUT: run.log, sd15.log, sd15_graphs.log, fmnist_speed.log, speed.json.
# Needs the wheels in .whl (common.sh says how); one device run with carry [".whl"] and timeout_s 600.
# CPU smoke test: ACCEL=cpu TINY=1 OUT=/tmp/o bash experiments/speed_rows.sh
set -u
: "${ACCEL:=gpu}" "${TINY:=0}" "${WORK:=/tmp/speed}" "${OUT:?}" "${DEADLINE_S:=480}"
source "$(dirname "$0")/common.sh"
export PYTHONUNBUFFERED=1
mkdir -p "$WORK" "$OUT"
log() { echo "== $(date +%T) [$(($(date +%s) - t0)) s] $*" | tee -a "$OUT/run.log"; }
T=(); B=(4 16); G=(16)
[ "$TINY" = 1 ] && T=(--tiny) && B=(1 2) && G=(2)
step() {  # step NAME SHARE_PERCENT CMD...: run CMD with SHARE_PERCENT of the time left, output to $OUT/NAME.log
  local name=$1 share=$2; shift 2
  local limit=$(($(left) * share / 100))
  [ "$limit" -lt 10 ] && { log "$name: skipped, $limit s left"; return; }  # (timeout 0 would mean no limit)
  log "$name: at most $limit s"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  log "$name: rc $?"; grep -E "^ *[0-9]+ +(True|False)|^\| |failed|^OOM" "$OUT/$name.log" | tee -a "$OUT/run.log"
}
step sd15 45 python3 experiments/bench_sd15_step.py "${T[@]}" --batch-sizes "${B[@]}" --iterations 5 --warmup 2
step sd15_graphs 35 python3 experiments/bench_sd15_step.py "${T[@]}" --batch-sizes "${G[@]}" --iterations 5 --warmup 3 \
  --compile-mode reduce-overhead
step fmnist_speed 95 python3 experiments/fmnist_speed.py "${T[@]}" --pairs "$WORK/pairs" --out "$WORK/fmnist_speed" \
  --iterations 40
cp "$WORK/fmnist_speed/speed.json" "$OUT/speed.json" 2>/dev/null
log "done"; ls -la "$OUT"
