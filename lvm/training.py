"""What every pre-training LightningModule of the trunk shares (LVMModule, AIMModule): the recipe's
optimiser and schedule, gradient-norm / lr / throughput / MFU logging, the checkpoint shape check and
the export at the end of fit. A subclass sets `self.model` (with `.config`, `.flops_per_token(seq_len)`,
`.save_pretrained(dir)`) and says how many tokens a batch holds (`batch_tokens`).

Recipe (LVM, arXiv 2312.00785; AIM trains the same way): AdamW betas (0.9, 0.95), weight decay on
Linear weights only, linear warmup then cosine to a minimum lr, stepped every optimiser step.
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from lvm.checkpoints import check_state_dict

log = logging.getLogger(__name__)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """lr multiplier: linear warmup to 1, cosine down to `min_ratio` at `total_steps`, then flat."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PretrainingModule(L.LightningModule):
    """Hyperparameters read here (the subclass's __init__ saves them): learning_rate, min_learning_rate,
    warmup_steps, decay_steps, betas, weight_decay, peak_flops_per_device, export_dir."""

    model: torch.nn.Module
    _window: dict | None = None  # the batches timed for tokens/s (see on_train_batch_end)

    @property
    def config(self):
        return self.model.config

    def batch_tokens(self, batch) -> tuple[int, int]:
        """(tokens in this rank's batch, sequence length) for throughput and MFU."""
        raise NotImplementedError

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        # Decay Linear weights only: embeddings and norm gains keep their scale (LLaMA practice).
        # Chosen by module type, not tensor shape, because FSDP flattens parameters.
        decay = {id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Linear)}
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) in decay], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, betas=tuple(self.hparams.betas))
        total = self.hparams.decay_steps or self.trainer.max_steps
        if total is None or total < 0:
            raise ValueError("the cosine schedule needs a length: set trainer.max_steps or model.decay_steps")
        min_ratio = self.hparams.min_learning_rate / self.hparams.learning_rate
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.hparams.warmup_steps, total, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the gradient norm before clipping (Lightning clips right after this hook)."""
        squares = [p.grad.detach().float().pow(2).sum() for p in self.model.parameters() if p.grad is not None]
        total = torch.stack(squares).sum() if squares else torch.zeros((), device=self.device)
        if isinstance(self.trainer.strategy, FSDPStrategy):  # each rank holds a shard of the gradients
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        self.log("train/grad_norm", total.sqrt())

    def log_lr(self) -> None:
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])

    # -- throughput ------------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """tokens/s over all ranks (padding included) and MFU from it, averaged over a window of the
        batches between two logging steps: a single batch's time is too noisy to read."""
        now = time.perf_counter()
        if self._window is None:  # the first batch (after start or validation) carries their set-up time
            self._window = {"start": now, "tokens": 0, "batches": 0}
            return
        window = self._window
        tokens, seq_len = self.batch_tokens(batch)
        window["tokens"] += tokens * self.trainer.world_size
        window["batches"] += 1
        tokens_per_s = window["tokens"] / (now - window["start"])
        flops = tokens_per_s * self.model.flops_per_token(seq_len)
        self.log("train/tokens_per_s", tokens_per_s)
        self.log("train/mfu", flops / (self.hparams.peak_flops_per_device * self.trainer.world_size))
        if window["batches"] >= self.trainer.log_every_n_steps * self.trainer.accumulate_grad_batches:
            self._window = {"start": now, "tokens": 0, "batches": 0}

    def on_validation_start(self) -> None:
        self._window = None  # validation time is not training throughput

    # -- checkpoints ---------------------------------------------------------------------------------------
    def check_checkpoint(self, checkpoint: dict, skip_prefix: str | None = None) -> None:
        """Name every tensor of a training checkpoint that does not fit this model before Lightning tries
        to load it (tensors under `skip_prefix`, e.g. a frozen teacher, left out)."""
        if "state_dict" not in checkpoint:  # FSDP sharded checkpoints load their weights apart from this dict
            return
        found = {k: v for k, v in checkpoint["state_dict"].items() if not (skip_prefix and k.startswith(skip_prefix))}
        with torch.device("meta"):  # shapes only, whatever the strategy's sharding
            expected = {f"model.{k}": v for k, v in type(self.model)(self.config).state_dict().items()}
        check_state_dict(
            expected, found, "the checkpoint",
            hint=f"was it trained with another model / model_overrides than {self.config.name}?",
        )  # fmt: skip

    def on_fit_end(self) -> None:
        """With `export_dir` set, the trained model's save_pretrained goes there."""
        if not self.hparams.export_dir:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Every rank takes part in gathering the shards; rank 0 receives the full weights.
            state = self.trainer.strategy.lightning_module_state_dict()
            if not self.trainer.is_global_zero:
                return
            model = type(self.model)(self.config)
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        elif self.trainer.is_global_zero:
            model = self.model
        else:
            return
        model.save_pretrained(self.hparams.export_dir)
        log.info("saved the trained %s to %s", type(model).__name__, self.hparams.export_dir)
