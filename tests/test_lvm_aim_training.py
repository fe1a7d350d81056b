"""AIMModule through the real train.py / LightningCLI: the loss falls, metrics are logged, the model is
exported; every configs/aim file instantiates with the paper's recipe; the sweep runner takes AIM."""

import csv
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

import train
from data.images import ImageDataModule
from lvm import scaling, sweep
from lvm.aim import AIM, AIMConfig
from lvm.aim_module import AIMModule

pytestmark = pytest.mark.slow  # AIM fits through the Lightning CLI and sweeps

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "aim").glob("*.yaml"))
TINY_DATA = ["--data.resolution", "16", "--data.batch_size", "8", "--data.num_workers", "0",
             "--data.train_samples_per_epoch", "400", "--data.val_zooms", "1", "--data.val_procedural", "4"]  # fmt: skip


def test_demo_config_trains_through_the_cli_and_the_loss_falls(tmp_path):
    logger = f'[{{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {{"save_dir": "{tmp_path}", "name": "csv"}}}}]'
    train.main([
        "fit", "--config", str(ROOT / "configs" / "aim" / "demo.yaml"), "--model.model", "aim_tiny",
        "--model.learning_rate", "3e-3", "--model.warmup_steps", "5", "--model.export_dir", str(tmp_path / "export"),
        "--trainer.max_steps", "120", "--trainer.val_check_interval", "120", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", logger,
        "--trainer.callbacks.init_args.dirpath", str(tmp_path / "checkpoints"), *TINY_DATA,
        "--data.procedural_fraction", "1.0", "--data.train_samples_per_epoch", "16",  # 16 images seen again and again
    ])  # fmt: skip
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10  # per-image prefixes make single steps noisy
    assert last < 0.97 * first, losses  # a fixed batch falls much faster: test_lvm_aim.py
    assert any(r.get("val/loss") for r in rows) and any(r.get("train/tokens_per_s") for r in rows)
    assert all(r["train/grad_norm"] for r in rows if r.get("train/loss"))
    model = AIM.from_pretrained(tmp_path / "export")
    assert model.config.name == "aim_tiny" and (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_prefix_is_drawn_per_image_from_1_to_n_minus_1():
    module = AIMModule(model="aim_tiny")
    drawn = module.sample_prefix(4000, torch.Generator().manual_seed(0))
    assert drawn.min() == 1 and drawn.max() == module.config.num_patches - 1
    assert len(drawn.unique()) == module.config.num_patches - 1


def test_resolution_that_does_not_fit_the_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="set data.resolution: 16"):
        train.main([
            "fit", "--config", str(ROOT / "configs" / "aim" / "demo.yaml"), "--model.model", "aim_tiny",
            "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.callbacks.init_args.dirpath", str(tmp_path), *TINY_DATA, "--data.resolution", "32",
        ])  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_set_the_recipe_and_instantiate(path):
    raw = yaml.safe_load(path.read_text())
    trainer, model, data = raw["trainer"], raw["model"]["init_args"], raw["data"]["init_args"]
    assert trainer["gradient_clip_val"] == 1.0 and any("ModelCheckpoint" in c["class_path"] for c in trainer["callbacks"])
    config = AIMConfig.from_name(model["model"])
    assert data["resolution"] == config.image_size
    if path.stem != "demo":
        assert path.stem == model["model"] and trainer["precision"] == "bf16-mixed"
        images = trainer["num_nodes"] * trainer["devices"] * trainer["accumulate_grad_batches"] * data["batch_size"]
        assert images == 4096  # the paper's batch
        assert (model["learning_rate"], model["weight_decay"]) == (1e-3, 0.05)
    cli = LightningCLI(
        subclass_mode_model=True, subclass_mode_data=True, run=False, args=[
            "--config", str(path), "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
            "--trainer.strategy", "auto", "--trainer.precision", "32", "--trainer.logger", "false",
            "--model.model", "aim_tiny", "--model.model_overrides", "null", "--model.export_dir", "null",
            "--data.root", "null", "--data.resolution", "16",
        ],
    )  # fmt: skip
    assert isinstance(cli.model, AIMModule) and isinstance(cli.datamodule, ImageDataModule)


def test_sweep_runner_takes_the_aim_objective(tmp_path):
    tiny = ["--data.init_args.resolution", "16", "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--data.init_args.train_samples_per_epoch", "16", "--data.init_args.val_zooms", "1",
            "--data.init_args.procedural_fraction", "0", "--model.init_args.model", "aim_tiny",
            "--model.init_args.warmup_steps", "1"]  # fmt: skip
    rows = sweep.main(["--out", str(tmp_path), "--config", "configs/aim/demo.yaml", "--sizes", "32x1", "--steps", "2", "--", *tiny])
    (row,) = rows
    config = AIMConfig.from_name("aim_tiny", **{k: v for k, v in sweep.size_overrides(32, 1).items() if k != "num_kv_heads"})
    assert row["tokens"] == 2 * 4 * config.num_patches  # AIM's tokens are patches
    assert row["params"] == scaling.num_params(config)
    assert row["flops"] == scaling.flops_per_token(config, config.num_patches) * row["tokens"]
    assert row["train_loss"] is not None and row["val_loss"] is not None
