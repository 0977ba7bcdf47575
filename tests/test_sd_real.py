"""sd/real.py and the real latents of SDDMDDataModule, on the tiny pipeline of test_sd.py: the cache is the VAE's
posterior mean, built once, reused, rebuilt when the source or VAE changes; train batches carry real_x and
real_cond from the seeded global stream (exact resume, rank slices); a short fit with the GAN on."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import MAX_LEN, embed, quiet_trainer, toy_optim, write_real_images
from PIL import Image

from dmd_lightning import DMDModule, DMLoss, GANLoss
from dmd_lightning.data.format import PairsError, shard_name
from dmd_lightning.sd import real as real_module
from dmd_lightning.sd.data import SDDMDDataModule
from dmd_lightning.sd.real import RealLatents, parquet_items


def vae_latents(pipe, folder, n):
    """What the cache must hold: AutoencoderKL's posterior mean of each 64x64 image, times scaling_factor."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae")
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f"{i}.png"))).permute(2, 0, 1) for i in range(n)])
    with torch.no_grad():
        return vae.encode(x.float() / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor


@pytest.fixture
def vae_loads(monkeypatch):
    """The pipeline folders whose VAE was loaded to encode images."""
    calls, load = [], real_module.load_encoder
    monkeypatch.setattr(real_module, "load_encoder", lambda path: calls.append(path) or load(path))
    return calls


def test_latents_are_the_vaes_posterior_mean_encoded_once(sd, tmp_path, vae_loads):
    captions = write_real_images(tmp_path / "real", 5)
    make = lambda: RealLatents(str(tmp_path / "real"), sd["pipe"], 64, str(tmp_path / "cache"), 2, 3)  # noqa: E731
    real = make().load()
    assert vae_loads == [sd["pipe"]] and real.captions == captions and real.images.dtype == torch.float16
    assert real.images.shape == (5, 4, 8, 8) and len(list(real.folder.glob("shard-*"))) == 2
    torch.testing.assert_close(real.images[:].float(), vae_latents(sd["pipe"], tmp_path / "real", 5),
                               atol=2e-3, rtol=2e-3)
    again = make().load()  # a second construction reads the cache
    assert vae_loads == [sd["pipe"]] and torch.equal(again.images[:], real.images[:])
    manifest = json.loads((real.folder / "manifest.json").read_text())
    assert manifest["resolution"] == 64 and manifest["vae"] == sd["pipe"] and manifest["num_images"] == 5

    (tmp_path / "real" / "1.txt").write_text("another caption\n")  # the source changed: rebuilt
    assert make().load().captions[1] == "another caption" and len(vae_loads) == 2


def test_a_changed_vae_or_a_corrupted_shard_is_never_read(sd, tmp_path, vae_loads):
    import shutil

    from diffusers import AutoencoderKL

    write_real_images(tmp_path / "real", 3)
    shutil.copytree(sd["pipe"] + "/vae", tmp_path / "pipe" / "vae")
    make = lambda: RealLatents(str(tmp_path / "real"), str(tmp_path / "pipe"), 64, str(tmp_path / "cache"))  # noqa: E731
    before = make().load().images[:]
    other = AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    other.save_pretrained(tmp_path / "pipe" / "vae")  # new weights at the same path: rebuilt
    after = make().load()
    assert len(vae_loads) == 2 and not torch.equal(after.images[:], before)
    shard = after.folder / shard_name(0)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PairsError, match="checksum mismatch in 'x'.*delete"):
        make().load()


def test_parquet_source_gives_the_folders_latents(sd, tmp_path, monkeypatch):
    captions = write_real_images(tmp_path / "real", 3)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as without pyarrow
    with pytest.raises(ImportError, match="pip install pyarrow"):
        next(parquet_items(tmp_path / "real.parquet"))
    monkeypatch.undo()
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    images = [{"bytes": (tmp_path / "real" / f"{i}.png").read_bytes(), "path": None} for i in range(3)]
    pq.write_table(pa.table({"image": images, "text": captions}), tmp_path / "real.parquet")
    folder = RealLatents(str(tmp_path / "real"), sd["pipe"], 64, str(tmp_path / "cache")).load()
    table = RealLatents(str(tmp_path / "real.parquet"), sd["pipe"], 64, str(tmp_path / "cache")).load()
    assert table.captions == captions and torch.equal(table.images[:], folder.images[:])


def data_module(sd, folder, batch_size=2, rank=0, world=1, **kw):
    """SDDMDDataModule without pairs, with the real images of `folder`, as rank `rank` of `world` devices."""
    real = RealLatents(str(folder), sd["pipe"], 64, str(folder.parent / "cache"))
    dm = SDDMDDataModule(None, sd["prompts"], sd["pipe"], **{"embedding_cache": sd["cache"], **kw},
                         batch_size=batch_size, latent_shape=[4, 8, 8], real_images=real)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, strategy=SimpleNamespace(root_device="cpu"),
                                 training=True)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_train_batches_carry_real_latents_with_their_captions(sd, tmp_path):
    captions = write_real_images(tmp_path / "real", 5)
    dm = data_module(sd, tmp_path / "real", batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["real_x"].shape == (3, *dm.sample_shape) and batch["real_cond"].shape == (3, MAX_LEN, 16)
    for x, cond in zip(batch["real_x"], batch["real_cond"]):  # each a cached latent with its own caption
        i = int((dm.real.images[:].float() - x).flatten(1).abs().sum(1).argmin())
        assert torch.equal(dm.real.images[i].float(), x)
        torch.testing.assert_close(cond, embed(sd, [captions[i]])[0], rtol=0, atol=0)


def test_prompts_embedded_on_the_device_equal_the_cached_ones_and_only_validation_prompts_are_cached(sd, tmp_path):
    """embed="device": token ids in the batch, encoded after the transfer (on_after_batch_transfer) by the text
    encoder: the same embeddings as the cache's float16 ones, up to their rounding."""
    write_real_images(tmp_path / "real", 5)
    cached = data_module(sd, tmp_path / "real", batch_size=3)
    device = data_module(sd, tmp_path / "real", batch_size=3, embed="device", embedding_cache=str(tmp_path / "pc"))
    a, b = (dm.train_batch(torch.Generator().manual_seed(4), 1) for dm in (cached, device))
    assert set(b) == {"z", "cond_ids", "real_x", "real_cond_ids"} and b["cond_ids"].dtype == torch.long
    b = device.on_after_batch_transfer(b, 0)
    assert set(b) == set(a) and device.position == 1
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-3, msg=k)
    assert len(list((tmp_path / "pc").glob("*.safetensors"))) == 1  # the validation prompts only


def test_real_stream_resumes_exactly_and_ranks_slice_the_global_batch(sd, tmp_path):
    write_real_images(tmp_path / "real", 5)
    it = iter(data_module(sd, tmp_path / "real").train_dataloader())
    batches = [next(it) for _ in range(4)]
    assert not torch.equal(batches[0]["real_x"], batches[3]["real_x"])
    resumed = data_module(sd, tmp_path / "real")
    resumed.load_state_dict({"position": 3})
    for k, v in next(iter(resumed.train_dataloader())).items():
        assert torch.equal(v, batches[3][k]), k

    single = next(iter(data_module(sd, tmp_path / "real", batch_size=4).train_dataloader()))
    ranks = [next(iter(data_module(sd, tmp_path / "real", 2, r, 2).train_dataloader())) for r in (0, 1)]
    assert set(single) == {"z", "cond", "real_x", "real_cond"}
    for k, v in single.items():
        assert torch.equal(torch.cat([ranks[0][k], ranks[1][k]]), v), k


def test_dmd2_fit_with_the_gan_on_real_latents(sd, teacher, tmp_path):
    write_real_images(tmp_path / "real", 4)
    dm = data_module(sd, tmp_path / "real")
    dm.trainer = None
    module = DMDModule(teacher, regression_loss=None, gan=GANLoss(generator_weight=1e-3, classifier_weight=1e-2),
                       dm_loss=DMLoss(guidance_scale=1.75), optim=toy_optim(warmup_steps=0))
    head = [p.detach().clone() for p in module.classifier.parameters()]
    trainer = quiet_trainer(tmp_path, max_steps=4)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert module.iteration == 2 and dm.state_dict()["position"] == 2
    assert torch.isfinite(metrics["generator/loss_gan"]) and torch.isfinite(metrics["fake_score/loss_classifier"])
    assert any(not torch.equal(a, b) for a, b in zip(head, module.classifier.parameters()))  # the head trained


def test_a_missing_caption_is_the_empty_prompt_not_the_text_none(tmp_path):
    from dmd_lightning.sd.real import folder_items

    rows = [{"file_name": "a.png", "text": None}, {"file_name": "b.png", "text": " a dog "}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert [caption for _, caption in folder_items(tmp_path)] == ["", "a dog"]


def test_photos_are_read_upright_by_their_exif_orientation(tmp_path):
    from dmd_lightning.sd.eval import ImageFolderDataset
    from dmd_lightning.sd.real import load_image

    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :8] = 255  # a landscape picture, white on the left
    stored = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90)  # stored sideways, as a camera does
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    (tmp_path / "photo").mkdir()
    (tmp_path / "upright").mkdir()
    stored.save(tmp_path / "photo" / "a.png", exif=exif)
    Image.fromarray(pixels).save(tmp_path / "upright" / "a.png")
    assert torch.equal(load_image(tmp_path / "photo" / "a.png", 8), load_image(tmp_path / "upright" / "a.png", 8))
    assert torch.equal(ImageFolderDataset(tmp_path / "photo", 8)[0], ImageFolderDataset(tmp_path / "upright", 8)[0])
