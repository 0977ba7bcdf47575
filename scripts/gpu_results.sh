#!/usr/bin/env bash
# Device run: the Fashion-MNIST results of the README (pairs -> three DMD variants -> FID) and the SD1.5-layout
# training-step benchmark. Needs the wheels in .whl and the idx files in .data (see scripts/gpu_teachers.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
mkdir -p /usr/share/datasets && ln -sfn "$PWD/.data/fashion-mnist" /usr/share/datasets/fashion-mnist
nvidia-smi -L
timeout 330 python3 -m dmd_lightning.demo --out /tmp/gpu --num-pairs 10000 --steps 50 --iterations 3000 \
  --max-time 00:00:00:50 --ablation --batch-size 64 --accelerator gpu > "$OUT/demo.log" 2>&1
grep -v -i -E "warn|━" "$OUT/demo.log" | tail -25
cp /tmp/gpu/results.json /tmp/gpu/samples.png "$OUT/" 2>/dev/null
timeout 80 python3 scripts/bench_sd15_step.py 2>&1 | grep -v -i warn | tee "$OUT/bench_sd15.log" | tail -12
