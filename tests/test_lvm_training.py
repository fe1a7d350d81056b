"""LVMModule: loss masking, schedule, learning, exact resume, DDP over 2 processes and 2 "nodes",
distillation, the configs, and the input errors raised before any compute.

Shards are real: procedural analogy sentences tokenized by a random-init `vqgan_tiny`
(64 codes, 256 tokens per image), two images per sentence.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy

from data.datamodule import TokenDataModule
from data.packing import IGNORE_INDEX
from data.sources import sentences_from_spec
from data.tokenize import tokenize_to_shards
from lvm import LVM, LVMConfig
from lvm.model import Block
from lvm.module import LVMModule, next_token_targets
from lvm.training import warmup_cosine
from tokenizer import VQGAN

ROOT = Path(__file__).resolve().parents[1]
CODES = 64  # vqgan_tiny's codebook
SHAPE = {"codebook_size": CODES, "vocab_size": CODES + 100}
TINY = dict(model="vqlm_tiny", model_overrides=SHAPE)
DATA = dict(seq_len=512, batch_size=2, num_workers=0, shuffle_buffer=8)  # a row holds two 258-token documents


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    torch.manual_seed(0)
    vq = VQGAN.from_name("vqgan_tiny").eval()
    out = tmp_path_factory.mktemp("lvm") / "shards"
    sentences = sentences_from_spec("procedural", split="train", image_size=32, count=48, images_per_sentence=2)
    tokenize_to_shards(sentences, vq, out, samples_per_shard=8, progress=False)  # 6 shards
    return str(out)


def first_batch(data: TokenDataModule) -> dict:
    return data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)


class RecordSteps(L.Callback):
    """Per-step training losses and rows of this rank; on train end, this rank's rows and weights
    go to `directory` (if given) so a test can compare the ranks of a multi-process run."""

    def __init__(self, directory: str | None = None):
        self.directory, self.losses, self.rows = directory, [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.rows.extend(batch["input_ids"].tolist())

    def on_train_end(self, trainer, module):
        if self.directory:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
            record = {"rows": self.rows, "state": module.model.state_dict(), "world_size": trainer.world_size}
            torch.save(record, Path(self.directory) / f"rank{trainer.global_rank}.pt")


def fit(module, tmp_path, steps, ckpt_path=None, callbacks=(), trainer_args=None, **data) -> tuple[L.Trainer, list]:
    """Fit `module` for `steps` on `data` (datamodule= or train_dataloaders=); returns the trainer and losses."""
    record = RecordSteps()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[record, *callbacks], **{"enable_checkpointing": False, **(trainer_args or {})},
    )  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path, **data)
    return trainer, record.losses


# -- the loss and the optimiser ------------------------------------------------------------------------
def test_targets_skip_padding_and_document_boundaries():
    labels = torch.tensor([[5, 6, 7, 8, 9, IGNORE_INDEX]])
    documents = torch.tensor([[0, 0, 0, 1, 1, -1]])
    # logits at t predict token t+1: 6, 7, then 8 opens document 1 (not predictable), 9, then padding
    assert next_token_targets(labels, documents).tolist() == [[6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]


def test_schedule_warms_up_then_decays_to_the_minimum():
    ratios = [warmup_cosine(step, warmup_steps=10, total_steps=110, min_ratio=0.2) for step in range(200)]
    assert ratios[0] == pytest.approx(0.1) and ratios[9] == pytest.approx(1.0)
    assert ratios[60] == pytest.approx(0.6)  # halfway down the cosine
    assert ratios[110] == pytest.approx(0.2) and ratios[199] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(ratios[9:], ratios[10:], strict=False))


def test_no_weight_decay_on_norms_and_embeddings():
    module = LVMModule(**TINY)
    module.trainer = L.Trainer(max_steps=10, logger=False)
    decayed, plain = module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    assert {names[id(p)] for p in plain["params"]} == {n for n in names.values() if "norm" in n or "embed_tokens" in n}
    assert "lm_head.weight" in {names[id(p)] for p in decayed["params"]}


# -- learning ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_model_overfits_one_batch(shards, tmp_path):
    L.seed_everything(0)
    row = first_batch(TokenDataModule(shards, **{**DATA, "batch_size": 1}))
    batch = {k: v[:, :128] for k, v in row.items()}  # a 128-token prefix: memorised in ~100 steps on 2 cores
    module = LVMModule(**TINY, learning_rate=1e-2, min_learning_rate=1e-3, warmup_steps=10)
    _, losses = fit(module, tmp_path, 120, train_dataloaders=torch.utils.data.DataLoader([batch] * 120, batch_size=None))
    assert losses[-1] < 0.1, losses[::10]


@pytest.mark.slow
def test_loss_falls_on_shards_with_metrics_and_export(shards, tmp_path):
    L.seed_everything(0)
    module = LVMModule(**TINY, learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=5, export_dir=str(tmp_path / "hf"))
    data = TokenDataModule(shards, val_fraction=0.2, **DATA)
    trainer, losses = fit(module, tmp_path, 30, datamodule=data, trainer_args={"val_check_interval": 15, "check_val_every_n_epoch": None})
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"train loss {first:.3f} -> {last:.3f}, val loss {float(trainer.callback_metrics['val/loss']):.3f}")
    assert last < first - 1.0, losses
    metrics = trainer.callback_metrics
    assert metrics["val/ppl"] == pytest.approx(metrics["val/loss"].exp())
    assert metrics["val/loss"] < losses[0]
    for key in ("train/ppl", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"):
        assert torch.isfinite(metrics[key]) and metrics[key] > 0, key
    print(f"tokens/s {float(metrics['train/tokens_per_s']):.0f}")
    exported = LVM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, CODES, (1, 32))
    torch.testing.assert_close(exported(ids), module.model(ids))


@pytest.mark.slow
def test_resume_gives_the_losses_of_a_straight_run(shards, tmp_path):
    def run(steps, name, ckpt_path=None):
        L.seed_everything(0)
        module = LVMModule(**TINY, learning_rate=3e-3, warmup_steps=5, decay_steps=20)  # one schedule for all runs
        checkpoints = ModelCheckpoint(tmp_path / name, save_last=True, every_n_train_steps=10)
        data = TokenDataModule(shards, **{**DATA, "batch_size": 1, "num_workers": 1})  # its position is checkpointed
        return fit(module, tmp_path, steps, ckpt_path, [checkpoints], {"enable_checkpointing": True}, datamodule=data)[1]

    straight = run(20, "straight")
    head = run(10, "head")
    tail = run(20, "tail", ckpt_path=tmp_path / "head" / "last.ckpt")
    assert len(head) == len(tail) == 10
    torch.testing.assert_close(torch.tensor(head + tail), torch.tensor(straight), rtol=0, atol=1e-6)


# -- distillation ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_distillation_adds_temperature_scaled_kl_and_keeps_the_teacher_out_of_checkpoints(shards, tmp_path):
    teacher_dir = tmp_path / "teacher"
    LVM(LVMConfig.from_name("vqlm_tiny", **SHAPE)).save_pretrained(teacher_dir)
    data = TokenDataModule(shards, **DATA)
    batch = first_batch(data)

    twin = LVMModule(**TINY, init_from=str(teacher_dir), teacher_path=str(teacher_dir))
    with torch.no_grad():
        parts = {k: float(v) for k, v in twin.losses(batch).items()}
    assert abs(parts["kl"]) < 1e-5 and parts["loss"] == pytest.approx(parts["ce"], abs=1e-4)

    student = LVMModule(**TINY, teacher_path=str(teacher_dir), distill_temperature=2.0, distill_weight=0.5)
    with torch.no_grad():
        parts = {k: float(v) for k, v in student.losses(batch).items()}
    assert parts["kl"] > 0 and parts["loss"] == pytest.approx(parts["ce"] + 0.5 * 2.0**2 * parts["kl"])

    teacher_before = {k: v.clone() for k, v in student.teacher.state_dict().items()}
    trainer, losses = fit(student, tmp_path, 3, datamodule=data)
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert saved and not [k for k in saved if k.startswith("teacher.")]
    for key, value in student.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    resumed = LVMModule(**TINY, teacher_path=str(teacher_dir), distill_temperature=2.0, distill_weight=0.5)
    fit(resumed, tmp_path, 4, ckpt_path=tmp_path / "student.ckpt", datamodule=TokenDataModule(shards, **DATA))


# -- bad input -------------------------------------------------------------------------------------------
def test_activation_checkpointing_is_a_training_switch():
    """Catches the switch not reaching the model, or leaking into the model's config (and so its exports)."""
    module = LVMModule(**TINY, activation_checkpointing=True)
    assert module.model.activation_checkpointing and not hasattr(module.config, "activation_checkpointing")
    with pytest.warns(FutureWarning, match="moved to model.activation_checkpointing"):  # the old spelling
        old = LVMModule(model="vqlm_tiny", model_overrides={**SHAPE, "activation_checkpointing": True})
    assert old.model.activation_checkpointing and old.config == module.config


def test_vocab_must_hold_codebook_and_specials():
    with pytest.raises(ValueError, match="vocab_size 65 is smaller than codebook_size 64"):
        LVMModule(model="vqlm_tiny", model_overrides={"codebook_size": CODES, "vocab_size": CODES + 1})


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, data, message",
    [
        (SHAPE, {"seq_len": 1024}, "seq_len 1024 is longer than the model's max_position_embeddings 512"),
        ({"codebook_size": 128, "vocab_size": 228}, {}, "tokenizer with 64 codes, the model vqlm_tiny expects 128"),
    ],
)
def test_data_that_does_not_fit_the_model_fails_before_training(shards, tmp_path, overrides, data, message):
    module = LVMModule(model="vqlm_tiny", model_overrides=overrides)
    with pytest.raises(ValueError, match=message):
        fit(module, tmp_path, 1, datamodule=TokenDataModule(shards, **{**DATA, **data}))


@pytest.mark.slow
def test_checkpoint_of_another_shape_lists_the_mismatched_tensors(shards, tmp_path):
    trainer, _ = fit(LVMModule(**TINY), tmp_path, 1, datamodule=TokenDataModule(shards, **DATA))
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    narrow = LVMModule(model="vqlm_tiny", model_overrides={**SHAPE, "hidden_size": 32, "intermediate_size": 88})
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)tensors differ.*model\.model\.embed_tokens\.weight: checkpoint \(164, 64\) vs model \(164, 32\)"):
        fit(narrow, tmp_path, 2, ckpt_path=tmp_path / "tiny.ckpt", datamodule=TokenDataModule(shards, **DATA))
    assert all(torch.equal(v, before[k]) for k, v in narrow.state_dict().items())  # nothing trained or loaded


# -- configs ---------------------------------------------------------------------------------------------
CONFIGS = sorted((ROOT / "configs" / "lvm").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_set_the_recipe_and_instantiate(path, shards):
    raw = yaml.safe_load(path.read_text())
    trainer, model, data = raw["trainer"], raw["model"]["init_args"], raw["data"]["init_args"]
    assert trainer["gradient_clip_val"] == 1.0 and any("ModelCheckpoint" in c["class_path"] for c in trainer["callbacks"])
    if path.stem != "demo":
        rows = trainer["num_nodes"] * trainer["devices"] * trainer["accumulate_grad_batches"] * data["batch_size"]
        assert rows * data["seq_len"] == 524_288 and trainer["precision"] == "bf16-mixed"
        assert (model["learning_rate"], model["min_learning_rate"], model["warmup_steps"]) == (1.5e-4, 3e-5, 8000)
    # The real file through the CLI, shrunk to one CPU process (Lightning's FSDP needs GPUs) and a tiny model.
    cli = LightningCLI(
        subclass_mode_model=True, subclass_mode_data=True, run=False, args=[
            "--config", str(path), "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
            "--trainer.strategy", "auto", "--trainer.precision", "32", "--trainer.logger", "false",
            "--model.model", "vqlm_tiny", "--model.model_overrides", str(SHAPE), "--model.export_dir", "null",
            "--data.train", shards, "--data.val", "null", "--data.seq_len", "512",
        ],
    )  # fmt: skip
    assert isinstance(cli.model, LVMModule) and isinstance(cli.datamodule, TokenDataModule)
    if isinstance(trainer.get("strategy"), dict):  # FSDP: one unit per transformer block
        parser = ArgumentParser()
        parser.add_argument("--strategy", type=FSDPStrategy)
        strategy = parser.instantiate(parser.parse_object({"strategy": trainer["strategy"]})).strategy
        assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
        assert model["activation_checkpointing"]


# -- several processes through the CLI ---------------------------------------------------------------------
def cli_run(tmp_path, shards, extra_args=(), extra_env=None) -> subprocess.Popen:
    """Start `train.py fit` on the demo config, shrunk to the tiny model and a few steps by an overlay config."""
    overlay = {
        "trainer": {
            "accelerator": "cpu", "strategy": "ddp", "max_steps": 4, "logger": False, "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True}},
                {"class_path": "test_lvm_training.RecordSteps", "init_args": {"directory": str(tmp_path / "ranks")}},
            ],
        },
        "model": {"init_args": {**TINY, "warmup_steps": 2, "export_dir": str(tmp_path / "hf")}},
        "data": {"init_args": {**DATA, "train": shards, "val": None, "val_fraction": 0.0, "batch_size": 1}},
    }  # fmt: skip
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    command = [sys.executable, "train.py", "fit", "--config", "configs/lvm/demo.yaml", "--config", str(tmp_path / "overlay.yaml")]
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PATH": os.environ["PATH"]}
    return subprocess.Popen([*command, *extra_args], cwd=ROOT, env={**env, **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]


def assert_ranks_disjoint_and_in_sync(directory: Path) -> None:
    ranks = [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    rows = [{tuple(row) for row in r["rows"]} for r in ranks]
    assert len(rows[0]) == len(rows[1]) == 4 and not rows[0] & rows[1]  # each rank reads its own shards
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key


@pytest.mark.slow
def test_ddp_two_processes_through_the_cli(shards, tmp_path):
    finish(cli_run(tmp_path, shards, ["--trainer.devices", "2"]))
    assert_ranks_disjoint_and_in_sync(tmp_path / "ranks")
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert LVM.from_pretrained(tmp_path / "hf").config.codebook_size == CODES


@pytest.mark.slow
def test_two_nodes_on_localhost(shards, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        cli_run(tmp_path, shards, ["--trainer.num_nodes", "2", "--trainer.devices", "1"],
                {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank), "WORLD_SIZE": "2"})
        for rank in range(2)
    ]  # fmt: skip
    for node in nodes:
        finish(node)
    assert_ranks_disjoint_and_in_sync(tmp_path / "ranks")
