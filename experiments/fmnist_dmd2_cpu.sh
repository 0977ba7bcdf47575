#!/usr/bin/env bash
# DMD2 on Fashion-MNIST at CPU scale (the runs of docs/experiments/fmnist.md, "DMD2 on the CPU"): the shipped configs
# at batch 32, fp32, each run on one thread for a fixed wall-time budget (BUDGET, default 70 minutes), two runs at a
# time on a 2-core machine; EMA FID on 1,000 samples of the validation seeds (val_seed 1) every 300 iterations, and at
# the end on the validation and the report seeds (2); training seeds 0 and 1 of each variant; then four steps at a
# lower lr and without the GAN; the GAN runs continued to 120 minutes; four steps with the DM loss's t capped at 0.25T,
# with a fake score per step, with 10 fake-score updates per generator update, and with a step per sample (continued to
# 120 minutes, and without the GAN); last, DMD (v1) by configs/fmnist.yaml on 1,000 DDIM-50 pairs for the same budget.
# Then the table, the FID curves and a sample grid.
# bash experiments/fmnist_dmd2_cpu.sh [WORK=runs/cpu_dmd2] [BUDGET=00:01:10:00]
set -u
: "${WORK:=runs/cpu_dmd2}" "${BUDGET:=00:01:10:00}"
mkdir -p "$WORK/runs"
run() {
  local name=$1 config=$2; shift 2
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CONFIG=$config python experiments/fmnist_variant.py "$WORK/runs/$name" "${PAIRS:-none}" \
    "$BUDGET" --trainer.accelerator cpu --trainer.precision 32-true --data.init_args.batch_size 32 \
    --trainer.max_steps 100000 --trainer.val_check_interval 300 --data.init_args.val_size 1000 \
    --data.init_args.val_batch_size 250 --trainer.log_every_n_steps 20 "$@" > "$WORK/$name.log" 2>&1
}
# the four-step runs before the last pair took DMD2's one step per update (the config now: a step per sample)
upd=(--model.init_args.step_draw update)
s1=(--seed_everything 1 --data.init_args.seed 1)
run gan_s0 configs/fmnist_dmd2.yaml & run nogan_s0 configs/fmnist_dmd2.yaml --model.init_args.gan null & wait
run gan_s1 configs/fmnist_dmd2.yaml --seed_everything 1 --data.init_args.seed 1 &
run gan_4step_s0 configs/fmnist_dmd2_4step.yaml "${upd[@]}" & wait
run nogan_s1 configs/fmnist_dmd2.yaml --model.init_args.gan null --seed_everything 1 --data.init_args.seed 1 &
run gan_4step_s1 configs/fmnist_dmd2_4step.yaml "${upd[@]}" --seed_everything 1 --data.init_args.seed 1 & wait
run init_1step configs/fmnist_dmd2.yaml --trainer.max_steps 0 &  # the untrained generators: iteration 0
run init_4step configs/fmnist_dmd2_4step.yaml "${upd[@]}" --trainer.max_steps 0 & wait
# four steps at lr 2e-5 for both networks: the config's 5e-5 (set for batch 256) scaled by sqrt(32 / 256), rounded
lr=(--model.init_args.optim.generator_lr 2e-5 --model.init_args.optim.fake_lr 2e-5)
run gan_4step_lr2e-5_s0 configs/fmnist_dmd2_4step.yaml "${upd[@]}" "${lr[@]}" &
run gan_4step_lr2e-5_s1 configs/fmnist_dmd2_4step.yaml "${upd[@]}" "${lr[@]}" "${s1[@]}" & wait
run nogan_4step_s0 configs/fmnist_dmd2_4step.yaml "${upd[@]}" --model.init_args.gan null &  # four steps without the GAN
run nogan_4step_s1 configs/fmnist_dmd2_4step.yaml "${upd[@]}" --model.init_args.gan null "${s1[@]}" &
wait
# the GAN runs of one and four steps continued from their checkpoints to 120 minutes of training each (Lightning's
# Timer counts their first 70), a one-step and a four-step run side by side; then FID after each step of four steps
longer() {
  local name=$1; shift
  RESUME=$WORK/runs/$name/version_0/checkpoints/last.ckpt BUDGET=00:02:00:00 run "${name}_120m" "$@"
}
longer gan_4step_s0 configs/fmnist_dmd2_4step.yaml "${upd[@]}" & longer gan_s0 configs/fmnist_dmd2.yaml & wait
longer gan_4step_s1 configs/fmnist_dmd2_4step.yaml "${upd[@]}" "${s1[@]}" &
longer gan_s1 configs/fmnist_dmd2.yaml "${s1[@]}" & wait
python experiments/fmnist_summary.py steps teacher "$WORK"/runs/{gan,nogan}_4step_s{0,1} \
  "$WORK"/runs/gan_4step_s{0,1}_120m
python experiments/fmnist_summary.py dmstep configs/fmnist_dmd2_4step.yaml \
  "$WORK"/runs/gan_4step_s{0,1}_120m/version_0/checkpoints/last.ckpt  # does the DM gradient improve each step?
python experiments/fmnist_summary.py dmbands configs/fmnist_dmd2_4step.yaml \
  "$WORK"/runs/gan_4step_s{0,1}_120m/version_0/checkpoints/last.ckpt  # ... from which noise levels?
# four steps with the DM loss's t in [0.02, 0.25]T, the band whose gradient improves every step on both seeds above
cap=(--model.init_args.dm_loss.t_range "[0.02, 0.25]")
run gan_4step_dmt0.25_s0 configs/fmnist_dmd2_4step.yaml "${upd[@]}" "${cap[@]}" &
run gan_4step_dmt0.25_s1 configs/fmnist_dmd2_4step.yaml "${upd[@]}" "${cap[@]}" "${s1[@]}" & wait
# four steps with a fake score per step (copy k trained on step k's outputs, giving step k's DM gradient)
per=(--model.init_args.fake_score_per_step true)
run gan_4step_perstep_s0 configs/fmnist_dmd2_4step.yaml "${upd[@]}" "${per[@]}" &
run gan_4step_perstep_s1 configs/fmnist_dmd2_4step.yaml "${upd[@]}" "${per[@]}" "${s1[@]}" & wait
python experiments/fmnist_summary.py steps "$WORK"/runs/gan_4step_perstep_s{0,1}
# four steps with 10 fake-score updates per generator update (DMD2's SD1.5 value; the config: 5)
r10=(--model.init_args.fake_updates_per_generator_update 10)
run gan_4step_ratio10_s0 configs/fmnist_dmd2_4step.yaml "${upd[@]}" "${r10[@]}" &
run gan_4step_ratio10_s1 configs/fmnist_dmd2_4step.yaml "${upd[@]}" "${r10[@]}" "${s1[@]}" & wait
python experiments/fmnist_summary.py steps "$WORK"/runs/gan_4step_ratio10_s{0,1}
# four steps with a step per sample (every batch holds the four steps in equal shares; DMD2: one step per update)
each=(--model.init_args.step_draw sample)
run gan_4step_each_s0 configs/fmnist_dmd2_4step.yaml "${each[@]}" &
run gan_4step_each_s1 configs/fmnist_dmd2_4step.yaml "${each[@]}" "${s1[@]}" & wait
python experiments/fmnist_summary.py steps "$WORK"/runs/gan_4step_each_s{0,1}
# ... continued to 120 minutes, as the GAN runs above; and the same without the GAN (70 minutes)
longer gan_4step_each_s0 configs/fmnist_dmd2_4step.yaml "${each[@]}" &
longer gan_4step_each_s1 configs/fmnist_dmd2_4step.yaml "${each[@]}" "${s1[@]}" & wait
python experiments/fmnist_summary.py steps "$WORK"/runs/gan_4step_each_s{0,1}_120m
run nogan_4step_each_s0 configs/fmnist_dmd2_4step.yaml "${each[@]}" --model.init_args.gan null &
run nogan_4step_each_s1 configs/fmnist_dmd2_4step.yaml "${each[@]}" --model.init_args.gan null "${s1[@]}" & wait
python experiments/fmnist_summary.py steps "$WORK"/runs/nogan_4step_each_s{0,1}
# DMD (v1), the paper's recipe (regression weight 0.25 on the teacher's DDIM-50 pairs, 1:1 updates), for the same
# 70 minutes as the DMD2 rows: 1,000 pairs (seeded by index: the first 1,000 of `make pairs`, as the v1 table's)
[ -f "$WORK/pairs/manifest.json" ] || dmd pairs --config configs/fmnist_pairs.yaml --trainer.accelerator cpu \
  --data.init_args.out_dir "$WORK/pairs" --data.init_args.num_pairs 1000 --trainer.default_root_dir "$WORK/pairs"
v1=(--data.init_args.pair_batch_size 32 --model.init_args.validate_raw false)
PAIRS=$WORK/pairs run dmd_v1_s0 configs/fmnist.yaml "${v1[@]}" &
PAIRS=$WORK/pairs run dmd_v1_s1 configs/fmnist.yaml "${v1[@]}" "${s1[@]}" & wait
grep -h RESULT "$WORK"/*.log
python experiments/fmnist_summary.py table "$WORK"
python experiments/fmnist_summary.py curves "$WORK/fid_curves.png" "$WORK"/runs/*
# the sample grids of the docs: the first runs, then the later four-step variants
rows=(gan_4step_s0 gan_4step_s1 gan_4step_lr2e-5_s0 gan_4step_lr2e-5_s1 nogan_4step_s0 nogan_4step_s1 gan_4step_dmt0.25_s0
      gan_4step_dmt0.25_s1 gan_4step_perstep_s0 gan_4step_perstep_s1 gan_s0 gan_s1 nogan_s0 nogan_s1 init_4step
      init_1step)
python experiments/fmnist_summary.py grid none "$WORK/samples.png" "${rows[@]/#/$WORK/runs/}"
later=(gan_4step_each_s0 gan_4step_each_s1 gan_4step_each_s0_120m gan_4step_each_s1_120m nogan_4step_each_s0
       nogan_4step_each_s1 gan_4step_perstep_s0 gan_4step_perstep_s1 gan_4step_ratio10_s0 gan_4step_ratio10_s1
       dmd_v1_s0 dmd_v1_s1)
python experiments/fmnist_summary.py grid none "$WORK/samples_later.png" "${later[@]/#/$WORK/runs/}"
