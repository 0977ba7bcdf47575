#!/usr/bin/env bash
# Device run for the README's Fashion-MNIST results: 10,000 DDIM-50 pairs of the shipped teacher, then four DMD
# variants side by side on one GPU for the same wall time (the paper's Table 2 ablation, and full DMD at twice the
# learning rates), FID/KID on 10,000 samples of the validation seeds, a grid. Writes to $OUT.
# Needs the wheels in .whl and the idx files in .data (see scripts/gpu_teachers.sh).
# A small run on CPU: ACCEL=cpu NUM_PAIRS=100 VAL=100 BATCH=4 MAX_TIME=00:00:00:40 VAL_EVERY=5 OUT=/tmp/o bash scripts/gpu_results.sh
set -u
: "${ACCEL:=gpu}" "${NUM_PAIRS:=10000}" "${VAL:=10000}" "${BATCH:=256}" "${MAX_TIME:=00:00:06:00}" "${VAL_EVERY:=400}"
: "${WORK:=/tmp/gpu}" "${OUT:?}"
if [ "$ACCEL" = gpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  mkdir -p /usr/share/datasets && ln -sfn "$PWD/.data/fashion-mnist" /usr/share/datasets/fashion-mnist
  nvidia-smi -L
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
mkdir -p "$WORK/runs" "$OUT"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/run.log"; }

log "pairs: $NUM_PAIRS"
python3 -m dmd_lightning.cli pairs --config configs/fmnist_pairs.yaml --trainer.accelerator "$ACCEL" \
  --trainer.enable_progress_bar false --trainer.default_root_dir "$WORK/pairs" --data.init_args.out_dir "$WORK/pairs" \
  --data.init_args.num_pairs "$NUM_PAIRS" --data.init_args.shard_size $((NUM_PAIRS < 500 ? NUM_PAIRS : 500)) \
  > "$WORK/pairs.log" 2>&1 || { tail -20 "$WORK/pairs.log"; exit 1; }
log "teacher FID"
python3 scripts/fmnist_summary.py teacher "$WORK/pairs" "$WORK/teacher.json" 2>&1 | grep TEACHER | tee -a "$OUT/run.log"

log "fit: four variants side by side, $MAX_TIME each, batch $BATCH + $BATCH"
variant() {
  local name=$1; shift
  python3 scripts/fmnist_variant.py "$WORK/runs/$name" "$WORK/pairs" "$MAX_TIME" --trainer.accelerator "$ACCEL" \
    --data.init_args.batch_size "$BATCH" --data.init_args.pair_batch_size "$BATCH" --data.init_args.val_size "$VAL" \
    --trainer.val_check_interval "$VAL_EVERY" "$@" > "$WORK/$name.log" 2>&1 &
}
variant full
variant regression_only --model.init_args.dm_weight 0
variant no_regression --model.init_args.regression_loss null
variant full_lr2x --model.init_args.generator_lr 1.0e-4 --model.init_args.fake_lr 2.0e-4
wait
names=(full regression_only no_regression full_lr2x)  # the grid's row order
grep -h RESULT "$WORK"/*.log | tee -a "$OUT/run.log"
for n in "${names[@]}"; do grep -q RESULT "$WORK/$n.log" || tail -15 "$WORK/$n.log"; done

log "grid and collection"
python3 scripts/fmnist_summary.py grid "$WORK/pairs" "$OUT/samples.png" "${names[@]/#/$WORK/runs/}" 2>&1 | tail -3
python3 - "$WORK" "$OUT/results.json" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
res = {"teacher": json.loads((work / "teacher.json").read_text())}
for f in sorted(work.glob("runs/*/result.json")):
    res[f.parent.name] = json.loads(f.read_text())
Path(sys.argv[2]).write_text(json.dumps(res, indent=2))
EOF
cp -r "$WORK/runs/full/student" "$OUT/student" 2>/dev/null
(cd "$WORK" && tar czf "$OUT/logs.tar.gz" *.log $(find runs -name "events.out.tfevents*") 2>/dev/null)
log "done"; ls -la "$OUT"
