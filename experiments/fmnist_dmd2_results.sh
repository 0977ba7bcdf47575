#!/usr/bin/env bash
# One GPU run for the DMD2 results on Fashion-MNIST (teacher v2 as shipped): four runs side by side on one GPU,
# FID/KID on 10,000 samples of the validation seeds (val_seed 1) and of the report seeds (2) at the end of the
# fixed budget of each config: DMD2 one step with the GAN (training seeds 0 and 1), without the GAN, and four steps.
# At most 8 files go to $OUT: run.log, results.tar.gz (logs, result.json, TensorBoard events, samples),
# dmd2_s0.tar and dmd2_4step.tar (EMA generators' UNets, float16).
# Needs the wheels in .whl and the idx files in .data/fashion-mnist (see ../shared/device/README.md).
# CPU smoke test: ACCEL=cpu TINY=1 OUT=/tmp/o bash experiments/fmnist_dmd2_results.sh
set -u
: "${ACCEL:=gpu}" "${TINY:=0}" "${WORK:=/tmp/dmd2}" "${OUT:?}" "${DEADLINE_S:=540}"
source "$(dirname "$0")/common.sh"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$WORK" "$OUT"
log() { echo "== $(date +%T) [$(($(date +%s) - t0)) s] $*" | tee -a "$OUT/run.log"; }
D=()
if [ "$TINY" = 1 ]; then
  D=(--data.init_args.val_size 20 --data.init_args.val_batch_size 10 --data.init_args.batch_size 4
     --trainer.max_steps 12 --trainer.val_check_interval 5 --trainer.precision 32-true
     --model.init_args.evaluator.init_args.max_reference 200 --model.init_args.evaluator.init_args.kid_subsets 5)
fi
budget=$(($(left) - 90))
log "DMD2: four runs side by side, $budget s each at most"
variant() {
  local name=$1 config=$2; shift 2
  CONFIG=$config python3 experiments/fmnist_variant.py "$WORK/runs/$name" none "$(hms $budget)" \
    --trainer.accelerator "$ACCEL" "${D[@]}" "$@" > "$WORK/$name.log" 2>&1 &
}
variant dmd2_s0 configs/fmnist_dmd2.yaml
variant dmd2_s1 configs/fmnist_dmd2.yaml --seed_everything 1 --data.init_args.seed 1
variant dmd2_nogan configs/fmnist_dmd2.yaml --model.init_args.gan null
variant dmd2_4step configs/fmnist_dmd2_4step.yaml
wait
names=(dmd2_s0 dmd2_s1 dmd2_nogan dmd2_4step)
grep -h RESULT "$WORK"/*.log | tee -a "$OUT/run.log"
for n in "${names[@]}"; do grep -q RESULT "$WORK/$n.log" || tail -15 "$WORK/$n.log"; done
for n in dmd2_s0 dmd2_4step; do [ -d "$WORK/runs/$n/student" ] && tar cf "$OUT/$n.tar" -C "$WORK/runs/$n" student; done
(cd "$WORK" && tar czf "$OUT/results.tar.gz" *.log $(find runs -name "events.out.tfevents*" -o -name result.json \
  -o -name samples.pt) 2>/dev/null)
log "done"; ls -la "$OUT"
