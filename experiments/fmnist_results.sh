#!/usr/bin/env bash
# One GPU run for the Fashion-MNIST results: teacher v2 by configs/fmnist_teacher.yaml (resumable), its check
# (python -m dmd_lightning.fmnist.teacher_check), 10,000 DDIM-50 pairs, then DMD by configs/fmnist.yaml: two training
# seeds and the paper's Table 2 ablation side by side, FID/KID on 10,000 samples. At most 8 files go to $OUT:
#   fmnist-teacher.tar (the export, with provenance.json), student_s{0,1}.tar (EMA generators, float16),
#   results.tar.gz (logs, JSON, TensorBoard events, grid), run.log; if the teacher's schedule did not fit in the
#   time, teacher_ckpt.tar.part-* instead: rerun with RESUME=<folder with those parts> to continue it.
# Needs the wheels in .whl and the idx files in .data/fashion-mnist (see ../shared/device/README.md).
# CPU smoke test: ACCEL=cpu TINY=1 OUT=/tmp/o bash experiments/fmnist_results.sh
# With TEACHER=<diffusers folder> it skips the teacher and its check (the README's CPU runs:
#   ACCEL=cpu TEACHER=weights/fmnist-teacher N_PAIRS=1000 ITERATIONS=400 VARIANT_THREADS=1 OMP_NUM_THREADS=2
#   DMD_ARGS="--data.init_args.val_size 1000 --data.init_args.batch_size 32 --data.init_args.pair_batch_size 32
#   --trainer.precision 32-true --model.init_args.validate_raw false" WORK=runs/cpu_v2 OUT=runs/cpu_v2/out).
set -u
: "${ACCEL:=gpu}" "${TINY:=0}" "${WORK:=/tmp/gpu}" "${OUT:?}" "${DEADLINE_S:=570}" "${RESUME:=}" "${TEACHER:=}"
: "${N_PAIRS:=10000}" "${ITERATIONS:=600}" "${DMD_ARGS:=}"
source "$(dirname "$0")/common.sh"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 DMD_GIT_COMMIT="${DMD_GIT_COMMIT:-unknown}"
mkdir -p "$WORK" "$OUT"
log() { echo "== $(date +%T) [$(($(date +%s) - t0)) s] $*" | tee -a "$OUT/run.log"; }
DATA=.data/fashion-mnist
T=(); C=(--num-images 1000 --num-samples 10000 --steps 50); P=(); D=(--data.init_args.val_size 10000)
if [ "$TINY" = 1 ]; then
  T=(--trainer.max_steps 4 --data.init_args.batch_size 16 --data.init_args.num_workers 0 --trainer.precision 32-true
     --model.init_args.compile false --model.init_args.block_out_channels "[16,16,32]" --model.init_args.warmup_steps 1)
  C=(--num-images 20 --num-samples 20 --steps 2); N_PAIRS=40; P=(--model.init_args.num_steps 2)
  D=(--data.init_args.val_size 20 --data.init_args.batch_size 4 --data.init_args.pair_batch_size 4
     --trainer.max_steps 8 --trainer.val_check_interval 2 --trainer.precision 32-true)
fi

GIVEN_TEACHER=$TEACHER
if [ -z "$TEACHER" ]; then
# 1. teacher v2 -------------------------------------------------------------------------------------------------
teacher_fit() {  # extra args; the export and the checkpoints land under $WORK
  timeout $(($(left) - 150)) python3 -m dmd_lightning.cli fit --config configs/fmnist_teacher.yaml \
    --trainer.accelerator "$ACCEL" --trainer.enable_progress_bar false --trainer.max_time "$(hms $(($(left) - 200)))" \
    --trainer.default_root_dir "$WORK/teacher_run" --trainer.logger.init_args.save_dir "$WORK/teacher_run" \
    --data.init_args.data_root "$DATA" --trainer.callbacks.folder "$WORK/fmnist-teacher" "${T[@]}" "$@" \
    > "$WORK/teacher.log" 2>&1
}
CKPT_ARGS=()
if [ -n "$RESUME" ]; then
  mkdir -p "$WORK/resume" && cat "$RESUME"/teacher_ckpt.tar.part-* | tar xf - -C "$WORK/resume" || exit 1
  CKPT_ARGS=(--ckpt_path "$WORK/resume/last.ckpt")
fi
log "teacher: fit (${RESUME:+resumed, }$(left) s left)"
teacher_fit "${CKPT_ARGS[@]}"; rc=$?
last=$(ls -d "$WORK"/teacher_run/teacher/version_*/checkpoints/last.ckpt 2>/dev/null | tail -1)
if [ $rc -ne 0 ] && [ -z "$last" ] && [ "$TINY" != 1 ]; then
  log "teacher: fit failed (rc $rc) before a checkpoint; retrying without torch.compile"; tail -20 "$WORK/teacher.log"
  teacher_fit "${CKPT_ARGS[@]}" --model.init_args.compile false; rc=$?
  last=$(ls -d "$WORK"/teacher_run/teacher/version_*/checkpoints/last.ckpt 2>/dev/null | tail -1)
fi
grep -v -i "warn" "$WORK/teacher.log" | tail -4
python3 - "$WORK/fmnist-teacher/provenance.json" configs/fmnist_teacher.yaml "${T[@]}" <<'EOF' > "$WORK/teacher_done"
import json, sys, yaml
prov = json.load(open(sys.argv[1]))
steps = yaml.safe_load(open(sys.argv[2]))["trainer"]["max_steps"]
args = sys.argv[3:]
steps = int(args[args.index("--trainer.max_steps") + 1]) if "--trainer.max_steps" in args else steps
print("yes" if prov["steps"] >= steps else "no")
print(json.dumps(prov), file=sys.stderr)
EOF
cat "$WORK/fmnist-teacher/provenance.json" | tee -a "$OUT/run.log"
tar cf "$OUT/fmnist-teacher.tar" -C "$WORK" fmnist-teacher
if [ "$(cat "$WORK/teacher_done")" != yes ]; then
  log "teacher: not finished (rc $rc); packing $last to resume"
  tar cf - -C "$(dirname "$last")" last.ckpt | split -b 15m - "$OUT/teacher_ckpt.tar.part-"
  (cd "$WORK" && tar czf "$OUT/results.tar.gz" teacher.log $(find teacher_run -name "events.out.tfevents*"))
  ls -la "$OUT"; exit 3
fi
TEACHER="$WORK/fmnist-teacher"

# 2. teacher check and pairs ------------------------------------------------------------------------------------
log "teacher check (v2)"
python3 -m dmd_lightning.fmnist.teacher_check --teacher "$TEACHER" --data-root "$DATA" "${C[@]}" \
  --out "$WORK/check_v2.json" > "$WORK/check_v2.log" 2>&1; tail -25 "$WORK/check_v2.log" | tee -a "$OUT/run.log"
fi
log "pairs: $N_PAIRS"
python3 -m dmd_lightning.cli pairs --config configs/fmnist_pairs.yaml --trainer.accelerator "$ACCEL" \
  --trainer.enable_progress_bar false --trainer.default_root_dir "$WORK/pairs" --data.init_args.out_dir "$WORK/pairs" \
  --model.init_args.teacher.init_args.path "$TEACHER" --data.init_args.num_pairs "$N_PAIRS" \
  --data.init_args.shard_size $((N_PAIRS < 500 ? N_PAIRS : 500)) "${P[@]}" > "$WORK/pairs.log" 2>&1 \
  || { tail -20 "$WORK/pairs.log"; exit 1; }

log "teacher FID on its pairs (fills the FID reference cache before the runs share it)"
python3 experiments/fmnist_summary.py teacher "$WORK/pairs" "$WORK/teacher_pairs.json" 2>&1 | grep TEACHER | tee -a "$OUT/run.log"

# 3. DMD: four runs side by side ----------------------------------------------------------------------------------
budget=$(($(left) - 75)); [ -n "$GIVEN_TEACHER" ] && [ "$ACCEL" = cpu ] && budget=86399  # CPU: the iterations decide
log "DMD: four runs side by side, $budget s each at most"
variant() {
  local name=$1; shift
  OMP_NUM_THREADS=${VARIANT_THREADS:-$OMP_NUM_THREADS} python3 experiments/fmnist_variant.py "$WORK/runs/$name" "$WORK/pairs" "$(hms $budget)" --trainer.accelerator "$ACCEL" \
    --model.init_args.teacher.init_args.path "$TEACHER" --trainer.max_steps $((2 * ITERATIONS)) "${D[@]}" $DMD_ARGS "$@" \
    > "$WORK/$name.log" 2>&1 &
}
variant full_s0
variant full_s1 --seed_everything 1 --data.init_args.seed 1
variant no_regression --model.init_args.regression_loss null
variant regression_only --model.init_args.dm_loss.weight 0 --trainer.max_steps $([ "$TINY" = 1 ] && echo 4 || echo "$ITERATIONS")
wait
names=(full_s0 full_s1 regression_only no_regression)
grep -h RESULT "$WORK"/*.log | tee -a "$OUT/run.log"
for n in "${names[@]}"; do grep -q RESULT "$WORK/$n.log" || tail -15 "$WORK/$n.log"; done

# 4. collect ------------------------------------------------------------------------------------------------------
log "grid and collection"
python3 experiments/fmnist_summary.py grid "$WORK/pairs" "$WORK/samples.png" "${names[@]/#/$WORK/runs/}" 2>&1 | tail -3
for s in 0 1; do [ -d "$WORK/runs/full_s$s/student" ] && tar cf "$OUT/student_s$s.tar" -C "$WORK/runs/full_s$s" student; done
(cd "$WORK" && tar czf "$OUT/results.tar.gz" *.log *.json samples.png fmnist-teacher/provenance.json \
  $(find runs teacher_run -name "events.out.tfevents*" -o -name result.json -o -name samples.pt) 2>/dev/null)
log "done"; ls -la "$OUT"
