"""Surviving faults (lvm.faults, scripts.fault_drill): atomic checkpoints on a full or read-only disk,
refused pickled code, outputs checked before compute, non-finite steps skipped and capped, preemption
signals, and a short fault drill (kill -9 of real `train.py` processes, compared with a straight run).
"""

import os
import resource
import signal
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from data.datamodule import TokenDataModule
from lvm.faults import AtomicCheckpointIO, FaultTolerance
from lvm.module import LVMModule
from scripts.fault_drill import DrillRecorder, drill, make_shards

pytestmark = pytest.mark.slow  # Lightning fits interrupted by injected faults

TINY = dict(model="vqlm_tiny", model_overrides={"codebook_size": 64, "vocab_size": 164}, warmup_steps=3, learning_rate=3e-3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("faults") / "shards")


class Weights(L.Callback):
    """A copy of the weights after every optimiser step."""

    def __init__(self):
        self.after = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = {k: v.clone() for k, v in module.state_dict().items()}


def fit(tmp_path, shards, steps=4, callbacks=(), **ckpt) -> tuple[L.Trainer, LVMModule]:
    torch.manual_seed(0)
    module = LVMModule(**TINY)
    data = TokenDataModule(str(shards / "train"), seq_len=512, batch_size=2, num_workers=0, shuffle_buffer=8)
    checkpoints = ModelCheckpoint(ckpt.get("dirpath", tmp_path / "checkpoints"), save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()], callbacks=[*callbacks, checkpoints],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer, module


# -- atomic checkpoints -------------------------------------------------------------------------------------
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """Simulated with RLIMIT_FSIZE (writes past the limit fail with EFBIG, as on a full disk), which needs
    no mount; test_read_only_directory_mid_run uses a real tmpfs where the machine allows one."""
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(10)}}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OSError, match=r"could not write the checkpoint .*last.ckpt.*previous last.ckpt is kept"):
            io.save_checkpoint({"state_dict": {"w": torch.ones(100_000)}}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert io.load_checkpoint(path)["state_dict"]["w"].shape == (10,)
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temp file left behind


class Opaque:
    def __reduce__(self):
        return (print, ("this code would run on load",))


def test_checkpoints_carrying_pickled_code_are_refused(tmp_path):
    torch.save({"state_dict": {}, "callbacks": {"x": Opaque()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="pickled objects beyond tensors"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")


# -- bad places ---------------------------------------------------------------------------------------------
def test_an_unwritable_output_directory_fails_before_compute(tmp_path, shards):
    (tmp_path / "a-file").write_text("")
    weights = Weights()
    with pytest.raises(OSError, match=r"output directory .*a-file/checkpoints cannot be written"):
        fit(tmp_path, shards, callbacks=[FaultTolerance(), weights], dirpath=tmp_path / "a-file" / "checkpoints")
    assert weights.after == {}  # not one step computed


def _mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True).returncode == 0


class MakeReadOnly(L.Callback):
    def __init__(self, directory: Path, at_step: int):
        self.directory, self.at_step = directory, at_step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            if os.geteuid() == 0:  # root ignores permissions: remount the tmpfs read-only
                subprocess.run(["mount", "-o", "remount,ro", str(self.directory)], check=True)
            else:
                self.directory.chmod(0o555)


def test_read_only_directory_mid_run_keeps_the_previous_checkpoint(tmp_path, shards):
    directory = tmp_path / "checkpoints"
    if os.geteuid() == 0 and not _mount_tmpfs(directory):
        pytest.skip("running as root without mount permission: cannot make a directory read-only")
    try:
        with pytest.raises(OSError, match=r"could not write the checkpoint .*(Read-only file system|Permission denied)"):
            fit(tmp_path, shards, steps=4, callbacks=[FaultTolerance(), MakeReadOnly(directory, at_step=2)], dirpath=directory)
        checkpoint = AtomicCheckpointIO().load_checkpoint(directory / "last.ckpt")
        assert checkpoint["global_step"] == 2 and not [p for p in os.listdir(directory) if p.endswith(".tmp")]
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(directory)], check=False)
        elif directory.exists():
            directory.chmod(0o755)


# -- bad numbers ----------------------------------------------------------------------------------------------
def test_non_finite_gradients_skip_the_step_and_stop_past_the_limit(tmp_path, shards):
    weights, guard = Weights(), FaultTolerance(max_skipped_steps=1)
    trainer, module = fit(tmp_path, shards, steps=4, callbacks=[guard, DrillRecorder(tmp_path / "r.jsonl", [2]), weights])
    for key, before in weights.after[1].items():  # step 2 had NaN gradients: nothing moved
        assert torch.equal(weights.after[2][key], before), key
    assert not all(torch.equal(weights.after[3][k], v) for k, v in weights.after[2].items())
    assert guard.skipped == 1 and float(trainer.callback_metrics["train/skipped_steps"]) == 1
    assert all(torch.isfinite(v).all() for v in module.state_dict().values())
    assert guard.state_dict()["skipped"] == 1  # kept in checkpoints: a resumed run keeps counting

    with pytest.raises(FloatingPointError, match=r"more than max_skipped_steps=1; the last at global step 3 \(epoch 0, batch 3\)"):
        fit(tmp_path / "b", shards, steps=6, callbacks=[FaultTolerance(max_skipped_steps=1), DrillRecorder(tmp_path / "s.jsonl", [2, 4])])
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")["global_step"] == 3


# -- preemption -----------------------------------------------------------------------------------------------
class SendSignal(L.Callback):
    def __init__(self, signum: int, at_step: int):
        self.signum, self.at_step = signum, at_step

    def on_before_backward(self, trainer, module, loss):  # mid-step: the save waits for the step's end
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_at_the_step_boundary_and_exits_cleanly(tmp_path, shards, signum):
    previous = signal.getsignal(signum)
    weights = Weights()
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, shards, steps=8, callbacks=[FaultTolerance(), SendSignal(signum, at_step=2), weights])
    assert stopped.value.code in (None, 0)
    checkpoint = AtomicCheckpointIO().load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3 and max(weights.after) == 3  # the signalled step finished, no other began
    for key, value in weights.after[3].items():
        assert torch.equal(checkpoint["state_dict"][key], value), key
    assert signal.getsignal(signum) == previous  # handlers restored


# -- gradient accumulation ------------------------------------------------------------------------------------
class InterruptAtBatch(L.Callback):
    def __init__(self, batches: int):
        self.batches, self.seen = batches, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen += 1
        if self.seen > self.batches:
            raise Interrupt


def test_resume_with_accumulation_never_saves_mid_accumulation(tmp_path, shards):
    """Killed after one micro-batch of a resumed run: without the guard, ModelCheckpoint rewrote last.ckpt
    there (same global step as the restore), and the next resume lost that micro-batch's gradient."""

    def run(directory, interrupt=None, resume=False):
        torch.manual_seed(0)
        module = LVMModule(**TINY, decay_steps=6)
        data = TokenDataModule(str(shards / "train"), seq_len=512, batch_size=2, num_workers=0, shuffle_buffer=8)
        checkpoints = ModelCheckpoint(directory, save_last=True, every_n_train_steps=2)
        callbacks = [FaultTolerance(), checkpoints, *([InterruptAtBatch(interrupt)] if interrupt else [])]
        trainer = L.Trainer(
            accelerator="cpu", max_steps=6, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=directory, plugins=[AtomicCheckpointIO()], callbacks=callbacks,
        )  # fmt: skip
        try:
            trainer.fit(module, datamodule=data, ckpt_path="last" if resume else None)
        except Interrupt:
            pass
        return module

    straight = run(tmp_path / "straight")
    run(tmp_path / "killed", interrupt=5)  # steps 1-2 (4 micro-batches) and one more micro-batch
    run(tmp_path / "killed", interrupt=1, resume=True)  # one micro-batch after the restore at step 2
    resumed = run(tmp_path / "killed", resume=True)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


# -- the tokenizer trainer ------------------------------------------------------------------------------------
class Interrupt(BaseException):
    """Stands for the kill: raised as a step begins, nothing saved after it."""


class InterruptAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Interrupt


@pytest.mark.slow
def test_tokenizer_training_resumes_to_the_straight_runs_weights(tmp_path):
    """Crops, their order and the quantizer's dead-code restarts (global RNG) all continue as in an
    unbroken run: resumed twice mid-epoch and once across an epoch boundary, the weights agree exactly."""
    from data.images import ImageDataModule
    from tokenizer.module import VQGANModule

    def run(directory, steps=16, interrupt=None, resume=False):
        L.seed_everything(0)
        module = VQGANModule(model="vqgan_tiny", perceptual_weight=0.0, disc_start=4, learning_rate=1e-3)
        data = ImageDataModule(resolution=32, batch_size=2, train_samples_per_epoch=10, procedural_fraction=0.5, val_zooms=1)
        checkpoints = ModelCheckpoint(directory, save_last=True, every_n_train_steps=2)
        callbacks = [FaultTolerance(), checkpoints, *([InterruptAt(interrupt)] if interrupt else [])]
        trainer = L.Trainer(
            accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, default_root_dir=directory, plugins=[AtomicCheckpointIO()], callbacks=callbacks,
        )  # fmt: skip
        try:
            trainer.fit(module, datamodule=data, ckpt_path="last" if resume else None)
        except Interrupt:
            pass
        return module

    straight = run(tmp_path / "straight")
    for i, step in enumerate([3, 7, 11, None]):  # global_step counts both optimisers: 5 batches = 10 steps per epoch
        resumed = run(tmp_path / "killed", interrupt=step, resume=i > 0)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


# -- kill -9 of real training processes ---------------------------------------------------------------------
@pytest.mark.slow
def test_short_fault_drill_kills_at_every_moment_and_resumes_exactly(tmp_path):
    """SIGKILL inside a step, in validation, right after a checkpoint and inside a checkpoint write
    (temp file present): the resumed run ends with the straight run's weights and per-step losses."""
    result = drill(tmp_path, kills=4, workers=[0], steps=12, seed=0, extra_faults=False)
    assert result["faults"]["injected"] >= 3, result
    assert result["faults"]["mismatches"] == 0 and result["faults"]["lost_checkpoints"] == 0, result
    assert result["faults"]["survived"] == result["faults"]["injected"], result


@pytest.mark.slow
def test_fault_drill_with_workers_signals_nan_and_tokenize(tmp_path):
    result = drill(tmp_path, kills=4, workers=[2], steps=12, seed=1, extra_faults=True)
    assert result["faults"]["mismatches"] == 0 and result["faults"]["lost_checkpoints"] == 0, result
    assert result["faults"]["survived"] == result["faults"]["injected"], result
