#!/usr/bin/env bash
# One GPU run for the DMD2 results on Fashion-MNIST (teacher v2 as shipped): four runs side by side on one GPU,
# FID/KID on 10,000 samples of the validation seeds (val_seed 1) and of the report seeds (2) at the end of the
# fixed budget of each config: DMD2 one step with the GAN (training seeds 0 and 1), without the GAN, and four steps.
# Training stops at each config's budget or at the shared deadline (DEADLINE_S, from the start), whichever comes first;
# each run is cut off shortly before the deadline whatever it is doing, its log kept. At most 8 files go to $OUT:
# run.log, the four runs' logs (written as they run), results.tar.gz (result.json, TensorBoard events, samples),
# dmd2_s0.tar and dmd2_4step.tar (EMA generators' UNets, float16).
# Needs the wheels in .whl and the idx files in .data/fashion-mnist (common.sh says how); one device run with
# carry [".whl", ".data"] and timeout_s 600.
# CPU smoke test (about 90 s on 2 cores; the default deadline cuts slower runs off): ACCEL=cpu TINY=1 OUT=/tmp/o
#   DEADLINE_S=1200 OMP_NUM_THREADS=1 bash experiments/fmnist_dmd2_results.sh
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
python3 -c "from dmd_lightning.fmnist.data import load_fashion_mnist as f; f(split='train'); f(split='test')" \
  || { log "preflight: no Fashion-MNIST idx files"; exit 1; }
budget=$(($(left) - 90))
log "DMD2: four runs side by side, training $budget s each at most"
variant() {  # its log straight to $OUT; killed 10 s before the deadline
  local name=$1 config=$2; shift 2
  CONFIG=$config timeout --signal=TERM --kill-after=5 $(($(left) - 10)) python3 experiments/fmnist_variant.py \
    "$WORK/runs/$name" none "$(hms $budget)" --trainer.accelerator "$ACCEL" "${D[@]}" "$@" > "$OUT/$name.log" 2>&1 &
}
variant dmd2_s0 configs/fmnist_dmd2.yaml
variant dmd2_s1 configs/fmnist_dmd2.yaml --seed_everything 1 --data.init_args.seed 1
variant dmd2_nogan configs/fmnist_dmd2.yaml --model.init_args.gan null
variant dmd2_4step configs/fmnist_dmd2_4step.yaml
wait
names=(dmd2_s0 dmd2_s1 dmd2_nogan dmd2_4step)
for n in "${names[@]}"; do grep -h RESULT "$OUT/$n.log" | tee -a "$OUT/run.log"; done
for n in "${names[@]}"; do grep -q RESULT "$OUT/$n.log" || tail -15 "$OUT/$n.log"; done
for n in dmd2_s0 dmd2_4step; do [ -d "$WORK/runs/$n/student" ] && tar cf "$OUT/$n.tar" -C "$WORK/runs/$n" student; done
(cd "$WORK" && tar czf "$OUT/results.tar.gz" $(find runs -name "events.out.tfevents*" -o -name result.json \
  -o -name samples.pt) 2>/dev/null)
log "done"; ls -la "$OUT"
