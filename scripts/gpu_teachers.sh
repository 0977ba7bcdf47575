#!/usr/bin/env bash
# Device run: train the FID classifier and the Fashion-MNIST teacher on one GPU, write them to $OUT.
# Needs the wheels in .whl (diffusers, jsonargparse and their pure-Python needs) and the idx files in .data.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch, lightning, diffusers; print(torch.__version__, lightning.__version__, diffusers.__version__)"
python3 -m dmd_lightning.classifier --data-root .data/fashion-mnist --epochs 15 --out "$OUT/fmnist-classifier.safetensors" 2>&1 | tail -2
timeout 330 python3 -m dmd_lightning.cli fit --config configs/fmnist_teacher.yaml \
  --trainer.accelerator gpu --trainer.precision bf16-mixed --trainer.max_time 00:00:04:15 --trainer.max_steps 100000 \
  --trainer.enable_progress_bar false --trainer.default_root_dir /tmp/teacher \
  --trainer.logger.init_args.save_dir /tmp/teacher \
  --data.init_args.data_root .data/fashion-mnist --data.init_args.batch_size 256 --data.init_args.num_workers 4 \
  --model.init_args.lr 3.0e-4 --trainer.callbacks.folder "$OUT/fmnist-teacher" 2>&1 | grep -v -i warn | tail -15
find /tmp/teacher -name "events*" -exec cp {} "$OUT/teacher.tfevents" \;
ls -laR "$OUT"
