"""The Fashion-MNIST configs end to end on a tiny UNet2DModel teacher: pairs -> fit -> validate -> predict."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from dmd_lightning.cli import cli

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fmnist")
    torch.manual_seed(0)
    UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4, num_class_embeds=11).save_pretrained(tmp / "teacher" / "unet")
    DDPMScheduler(clip_sample=False).save_pretrained(tmp / "teacher" / "scheduler")
    teacher = ["--model.init_args.teacher.init_args.path", str(tmp / "teacher")]
    cli(["pairs", "--config", str(ROOT / "configs/fmnist_pairs.yaml"), *teacher,
         "--data.init_args.out_dir", str(tmp / "pairs"), "--data.init_args.num_pairs", "20",
         "--data.init_args.shard_size", "10", "--data.init_args.batch_size", "10", "--model.init_args.num_steps", "3",
         "--trainer.default_root_dir", str(tmp / "pairs"), "--trainer.enable_progress_bar", "false"])
    expect = {"teacher": str(tmp / "teacher"), "sampler": "ddim", "num_steps": 3, "guidance_scale": 1.0}
    common = ["--config", str(ROOT / "configs/fmnist.yaml"), *teacher, "--data.init_args.pairs_dir", str(tmp / "pairs"),
              "--data.init_args.expect", json.dumps(expect), "--data.init_args.batch_size", "4",
              "--data.init_args.pair_batch_size", "4", "--data.init_args.val_size", "40",
              "--data.init_args.val_batch_size", "20",
              "--model.init_args.evaluator.init_args.max_reference", "200",
              "--model.init_args.evaluator.init_args.kid_subsets", "5",
              "--model.init_args.evaluator.init_args.cache_dir", str(tmp / "fid"),
              "--trainer.logger.init_args.save_dir", str(tmp / "logs"), "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp / "fit")]
    return tmp, common


def test_fit_validate_and_predict_with_the_real_configs(run):
    tmp, common = run
    fit = cli(["fit", *common, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"])
    assert fit.model.iteration == 2 and "val/fid" in fit.trainer.callback_metrics
    ckpt = next(tmp.rglob("last.ckpt"))
    validate = cli(["validate", *common, "--ckpt_path", str(ckpt)])
    # the checkpoint holds the EMA generator that the fit's last validation scored, on the same seeds
    torch.testing.assert_close(validate.trainer.callback_metrics["val/fid"], fit.trainer.callback_metrics["val/fid"])
    cli(["predict", *common, "--ckpt_path", str(ckpt), "--trainer.callbacks.out", str(tmp / "samples.npz")])
    samples = np.load(tmp / "samples.npz")
    assert samples["images"].shape == (40, 32, 32, 1) and samples["images"].dtype == np.uint8
    assert samples["labels"].tolist() == [i % 10 for i in range(40)]
