"""VQGANModule and the image data module: losses, GAN step, LPIPS weights, CLI fit + resume."""

import csv
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from data.images import ImageCrops, ImageDataModule
from tokenizer import VQGAN
from tokenizer.module import VQGANModule, build_lpips

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="vqgan_tiny", perceptual_weight=0.0)


def _trainer(tmp_path, steps, **kwargs):
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip


def _write_bad_and_odd_images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    (folder / "nested").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / "nested" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("P").save(folder / "palette.gif")
    good = folder / "rgb.jpg"
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    (folder / "notes.txt").write_text("not an image")


def test_image_folder_converts_modes_and_skips_unreadable_files(tmp_path, caplog):
    _write_bad_and_odd_images(tmp_path / "images")
    dm = ImageDataModule(root=str(tmp_path / "images"), resolution=32, batch_size=2, val_every=100)
    dm.setup()
    crops = ImageCrops(dm.train_set.images, 32, train=False)
    samples = [crops[i] for i in range(len(crops))]
    assert all(s.shape == (3, 32, 32) and 0 <= s.min() and s.max() <= 1 for s in samples)
    assert len(crops.failed) == 1 and "truncated.jpg" in caplog.text  # skipped, counted, logged
    assert not any(p.name == "notes.txt" for p in dm.train_set.images + dm.val_set.images)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 3, 32, 32)


def test_embedded_photos_validation_is_held_out():
    dm = ImageDataModule(resolution=32, val_zooms=2)
    dm.setup()
    train_ids = {id(im) for im in dm.train_set.images}
    assert len(dm.val_set) == 2 * len(dm.val_set.images) and not train_ids & {id(im) for im in dm.val_set.images}


def test_procedural_images_join_training_and_validation_from_disjoint_seeds():
    dm = ImageDataModule(resolution=32, train_samples_per_epoch=40, procedural_fraction=0.25, val_procedural=6)
    dm.setup()
    photos, procedural = dm.train_set.datasets
    held_out = dm.val_set.datasets[1]
    assert len(photos) == 30 and len(procedural) == 10 and len(held_out) == 6
    assert not set(procedural.seeds) & set(held_out.seeds)
    assert procedural[0].shape == (3, 32, 32) and not torch.equal(procedural[0], procedural[1])


def test_reconstruction_loss_weighs_l1_and_squared_error():
    images, recon = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)
    for weights, expected in (({}, 0.5), ({"l1_weight": 0.0, "l2_weight": 1.0}, 0.25), ({"l2_weight": 2.0}, 1.0)):
        loss, parts = VQGANModule(**TINY, **weights)._reconstruction_loss(images, recon)
        assert loss.item() == pytest.approx(expected) and parts["l2"].item() == pytest.approx(0.25), weights


def test_vlm_scenes_join_the_mix_beside_procedural_images():
    dm = ImageDataModule(resolution=32, train_samples_per_epoch=40, procedural_fraction=0.5, scene_fraction=0.25, val_procedural=4)
    dm.setup()
    photos, procedural, scenes = dm.train_set.datasets
    assert (len(photos), len(procedural), len(scenes)) == (10, 20, 10)
    held_out = dm.val_set.datasets[2]
    assert len(held_out) == 4 and not set(scenes.seeds) & set(held_out.seeds)
    # the VLM's own renders: saturated shape colours (a grey blur would not have them)
    image = scenes[0]
    assert image.shape == (3, 32, 32) and (image.amax(0) - image.amin(0)).max() > 0.5
    with pytest.raises(ValueError, match="procedural_fraction 0.8 \\+ scene_fraction 0.4"):
        ImageDataModule(resolution=32, procedural_fraction=0.8, scene_fraction=0.4).setup()


@pytest.mark.slow
def test_gan_phase_trains_the_discriminator_with_adaptive_weight(tmp_path):
    L.seed_everything(0)
    module = VQGANModule(**{**TINY, "perceptual_weight": 1.0}, lpips_vgg_weights="random", disc_start=0)
    before = [p.detach().clone() for p in module.discriminator.parameters()]
    images = torch.rand(16, 3, 32, 32)
    loader = torch.utils.data.DataLoader(images, batch_size=4)
    trainer = _trainer(tmp_path, steps=4)
    trainer.fit(module, loader)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 4  # two optimiser steps per batch
    for key in ("train/gan", "train/gan_weight", "train/disc", "train/lpips", "train/l1"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/gan_weight"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, module.discriminator.parameters(), strict=True))


@pytest.mark.slow
def test_lpips_loads_vgg16_weights_from_a_local_path(tmp_path):
    vgg = torchvision.models.vgg16()
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    model = build_lpips(str(tmp_path / "vgg16.pth"))
    assert torch.equal(model.net.slice1[0].weight, vgg.features[0].weight)
    assert torch.equal(model.net.slice5._modules["28"].bias, vgg.features[28].bias)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision vgg16"):
        build_lpips(str(tmp_path / "other.pth"))


def _read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cli_fit_with_csv_logger_resumes_and_exports(tmp_path):
    run = tmp_path / "run"
    common = [
        sys.executable, "train.py", "fit", "--config", "configs/tokenizer/demo.yaml",
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
        "--trainer.callbacks.init_args.dirpath", str(run / "checkpoints"),
        "--trainer.callbacks.init_args.every_n_train_steps", "4",
        "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
        "--model.disc_start", "2",
        "--model.export_dir", str(run / "vqgan"),
        "--data.resolution", "32", "--data.batch_size", "2", "--data.num_workers", "0",
        "--data.train_samples_per_epoch", "40", "--data.val_zooms", "1",
    ]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    first = subprocess.run([*common, "--trainer.max_steps", "8"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").exists()
    rows = _read_metrics(next(run.glob("csv/version_0/metrics.csv")))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/l1") for r in rows)
    assert list((run / "csv" / "version_0" / "reconstructions").glob("*.png"))
    exported = VQGAN.from_pretrained(run / "vqgan")
    assert exported.config.resolution == 32 and exported.encode(torch.rand(1, 3, 32, 32)).shape == (1, 64)

    second = subprocess.run(
        [*common, "--trainer.max_steps", "12", "--ckpt_path", "last"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 12


@pytest.mark.slow
def test_small_vqgan_learns_the_embedded_photos(tmp_path):
    """The demo preset with dead-code restarts, a few hundred steps on CPU: held-out L1 at least halves
    and most of its 512-code book is in use."""
    L.seed_everything(0)
    steps = 600
    module = VQGANModule(
        model="vqgan_demo", model_overrides={"dead_code_threshold": 0.05},
        perceptual_weight=0.0, disc_start=10**9, learning_rate=1e-3, betas=(0.9, 0.99),
    )  # fmt: skip
    data = ImageDataModule(resolution=32, batch_size=8, train_samples_per_epoch=8 * steps, val_zooms=1)
    trainer = _trainer(tmp_path, steps=2 * steps, val_check_interval=steps, num_sanity_val_steps=0)
    before = trainer.validate(module, data, verbose=False)[0]["val/l1"]
    trainer.fit(module, data)
    after = float(trainer.callback_metrics["val/l1"])
    usage = float(trainer.callback_metrics["train/codebook_usage"])
    print(f"val L1 {before:.4f} -> {after:.4f}, codebook usage {usage:.3f}")
    assert after <= 0.5 * before
    assert usage > 0.5
