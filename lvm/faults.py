"""Surviving faults in training, for every model family's Trainer (tokenizer, LVM, VLM).

    trainer:
      plugins: [{class_path: lvm.faults.AtomicCheckpointIO}]
      callbacks: [{class_path: lvm.faults.FaultTolerance, init_args: {max_skipped_steps: 10}}]

`AtomicCheckpointIO` writes every checkpoint to a temporary file beside the target, fsyncs and renames
it: a kill at any moment leaves the previous checkpoint whole, and a failed write (disk full,
read-only directory) leaves it untouched. It loads with `weights_only=True`, refusing pickled code.

`FaultTolerance`:
  - checks before any compute that the checkpoint and log directories can be written, and removes the
    temporary files of checkpoint writes that a kill interrupted;
  - on SIGTERM or SIGUSR1 (SLURM's warning signal; SLURMEnvironment's `requeue_signal` under SLURM)
    finishes the current step, saves `last.ckpt`, requeues the job when Lightning's SLURMEnvironment
    has `auto_requeue`, and exits (status 0). Lightning's own SLURM handler would save from inside the
    signal handler, mid-step; this one waits for the step boundary so the checkpoint is consistent;
  - skips an optimiser step whose gradients are not finite (a non-finite loss makes them so): weights
    and optimiser state stay as they were; the count is logged as `train/skipped_steps` and kept in
    checkpoints; past `max_skipped_steps` training stops with an error naming the step and the batch.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lvm.checkpoints import atomic_torch_save, load_weights_only

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written atomically (temp file in the same directory, fsync, rename) and
    read with `weights_only=True`."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(checkpoint, path)
        except (OSError, RuntimeError) as e:  # torch reports a short write (a full disk) as a RuntimeError
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
            kept = (
                f"the previous {path.name} is kept unchanged"
                if path.exists()
                else f"no {path.name} was written"
            )
            raise OSError(
                f"could not write the checkpoint {path} ({reason}; "
                f"{free / 2**20:.1f} MiB free there); {kept}. Free space or fix the directory's "
                "permissions, then resume with --ckpt_path last"
            ) from e

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        """Tensors and plain containers only, on the CPU: a checkpoint carrying pickled code is refused."""
        try:
            return load_weights_only(path)
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as error:  # torch reads an empty or cut file as an invalid argument
            raise ValueError(f"{path} is not a readable torch checkpoint ({error}); resume from another one") from error


def _probe_writable(directory: Path) -> None:
    """Create, write and remove a file in `directory`: fails now rather than after hours of compute."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(
            f"the output directory {directory} cannot be written ({e.strerror or e}): "
            "fix its permissions or free space, or point trainer.default_root_dir / the checkpoint "
            "dirpath elsewhere"
        ) from e


class FaultTolerance(L.Callback):
    """Preemption signals, non-finite steps and unwritable outputs (see the module docstring)."""

    def __init__(self, max_skipped_steps: int = 10, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
        self.max_skipped_steps = max_skipped_steps
        self.signals = tuple(signals)
        self.skipped = 0  # optimiser steps skipped for non-finite gradients, over the whole run
        self._received: int | None = None  # the signal waiting for the step boundary
        self._previous: dict[int, object] = {}
        self._batch: tuple[int, int] = (0, 0)  # (epoch, batch index) of the batch being trained
        self._rng: dict | None = None  # RNG states from a checkpoint, until the first step restores them

    # -- bad places --------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        dirs = {Path(trainer.default_root_dir)}
        dirs |= {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
        dirs |= {Path(lg.save_dir) for lg in trainer.loggers if getattr(lg, "save_dir", None)}
        for directory in sorted(dirs):
            _probe_writable(directory)
        for cb in trainer.checkpoint_callbacks:  # temp files of writes a kill interrupted: as large as a checkpoint
            for stale in Path(cb.dirpath).glob(".*.ckpt.*.tmp") if getattr(cb, "dirpath", None) else []:
                stale.unlink(missing_ok=True)
                log.warning("removed %s, left by an interrupted checkpoint write", stale)

    # -- preemption --------------------------------------------------------------------------------
    def _signal_numbers(self, trainer: L.Trainer) -> list[int]:
        env = trainer._accelerator_connector.cluster_environment
        numbers = []
        for name in self.signals:
            number = getattr(signal, name, None)
            if name == "SIGUSR1" and isinstance(env, SLURMEnvironment) and env.requeue_signal is not None:
                number = env.requeue_signal
            if number is not None:
                numbers.append(int(number))
        return numbers

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run starts from a checkpoint of this very step. ModelCheckpoint does not know that and
        # with gradient accumulation would save again after the first micro-batch: a checkpoint whose data
        # position counts a micro-batch whose gradient it does not hold (resuming from it loses that batch).
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and trainer.global_step > 0:
                cb._last_global_step_saved = trainer.global_step
        # Replaces Lightning's handlers (registered as fit starts): its SIGTERM handler stops validation and
        # exits without saving, its SLURM SIGUSR1 handler saves from inside the handler, mid-step.
        launcher = trainer.strategy.launcher
        for number in self._signal_numbers(trainer):
            self._previous[number] = signal.getsignal(number)

            def handler(signum, frame):
                log.warning("received signal %d: saving at the end of this step", signum)
                if self._received is None and launcher is not None and hasattr(launcher, "kill"):
                    launcher.kill(signum)  # processes this one launched (DDP without torchrun / srun)
                self._received = signum

            signal.signal(number, handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch = (trainer.current_epoch, batch_idx)
        if self._rng is not None:
            self._restore_rng()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped))
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid-accumulation the gradients of the micro-batches so far would be lost
        received = self._received is not None
        if trainer.world_size > 1:  # every rank saves at the same step (saving gathers the data position)
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        signum, self._received = self._received or signal.SIGTERM, None
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                # Recorded before saving: the checkpoint carries it, so the resumed run keeps writing last.ckpt.
                cb.last_model_path = os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
                trainer.save_checkpoint(cb.last_model_path)
                log.warning("signal %d: saved %s at step %d", signum, cb.last_model_path, trainer.global_step)
        env = trainer._accelerator_connector.cluster_environment
        if (
            signum != signal.SIGTERM
            and isinstance(env, SLURMEnvironment)
            and env.auto_requeue
            and trainer.is_global_zero
        ):
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            status = subprocess.call(["scontrol", "requeue", job])
            log.warning("requeued SLURM job %s" if status == 0 else "requeueing SLURM job %s failed", job)
        # Lightning's own SIGTERM path ends the run once this batch's hooks and logging are done: a
        # SIGTERMException (a SystemExit, status 0), so on_fit_end's export does not run on a partial model.
        trainer._signal_connector.received_sigterm = True

    # -- bad numbers -------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())  # one sync
        if trainer.world_size > 1:  # FSDP ranks hold different shards: all skip if any saw a bad value
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        # Optimisers skip parameters without a gradient: weights and moments stay as they were.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        epoch, batch_idx = self._batch
        where = f"global step {trainer.global_step} (epoch {epoch}, batch {batch_idx})"
        log.warning("non-finite loss or gradients at %s: step skipped (%d so far)", where, self.skipped)
        if self.skipped > self.max_skipped_steps:
            raise FloatingPointError(
                f"{self.skipped} optimiser steps had a non-finite loss or gradients, more than max_skipped_steps="
                f"{self.max_skipped_steps}; the last at {where}. The last good checkpoint is kept: lower the "
                "learning rate or check that batch's data, then resume with --ckpt_path last"
            )

    # -- state kept in checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        # The global RNGs as they are after the step being saved (e.g. the VQGAN's dead-code restarts draw
        # from torch's): restored as the first step of a resumed run begins, after everything set-up drew.
        kind, keys, *rest = np.random.get_state()  # its key array as a tensor: weights_only loads take no ndarrays
        rng = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), *rest),
               "python": random.getstate()}  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"skipped": self.skipped, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state["skipped"])
        self._rng = state.get("rng")

    def _restore_rng(self) -> None:
        rng, self._rng = self._rng, None
        torch.set_rng_state(rng["torch"])
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
