"""AIM pre-training as a LightningModule: next-patch regression on images, through the same train.py,
optimiser, schedule, logging and checkpoints as the LVM (lvm/training.py).

Each image draws its own prefix length uniformly from 1..N-1, as the paper does (section 3), so the
trunk learns to serve both the prefix (bidirectional) and the causal positions; validation draws from
a generator seeded by the batch index, so every validation pass scores the same prefixes.
Data: `data.images.ImageDataModule` (image folders, or the embedded photos and procedural images),
float [B, 3, H, W] in [0, 1] at the model's image_size.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from lvm.aim import AIM, AIMConfig
from lvm.training import PretrainingModule


class AIMModule(PretrainingModule):
    def __init__(
        self,
        model: str = "aim_demo",
        model_overrides: dict | None = None,
        init_from: str | None = None,
        learning_rate: float = 1e-3,
        min_learning_rate: float = 0.0,
        warmup_steps: int = 31250,
        decay_steps: int | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        activation_checkpointing: bool = False,
        compile: bool = False,
        peak_flops_per_device: float = 989e12,
        export_dir: str | None = None,
    ):
        """`model`: an AIM preset (lvm.aim.AIMConfig.from_name) with `model_overrides` applied; `init_from`
        starts from a saved AIM instead. The defaults are the AIM paper's recipe (AdamW (0.9, 0.95), peak
        lr 1e-3 cosine to 0, weight decay 0.05). `export_dir` receives AIM.save_pretrained at the end of fit.
        `activation_checkpointing` and `compile` are training switches, as in LVMModule."""
        super().__init__()
        self.save_hyperparameters()
        overrides = model_overrides or {}
        self.model = AIM.from_pretrained(init_from, **overrides) if init_from else AIM(AIMConfig.from_name(model, **overrides))
        self.model.activation_checkpointing = activation_checkpointing
        self.val_loss = MeanMetric()

    def batch_tokens(self, images: torch.Tensor) -> tuple[int, int]:
        n = self.config.num_patches
        return images.shape[0] * n, n

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        resolution = getattr(getattr(data, "hparams", None), "resolution", None)
        if resolution is not None and resolution != self.config.image_size:
            raise ValueError(
                f"data.resolution {resolution} but {self.config.name} takes {self.config.image_size}x"
                f"{self.config.image_size} images: set data.resolution: {self.config.image_size}"
            )
        if self.hparams.compile:
            self.model.compile()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint)

    def sample_prefix(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """long [batch], uniform in 1..N-1."""
        return torch.randint(1, self.config.num_patches, (batch,), generator=generator).to(self.device)

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(images, prefix_len=self.sample_prefix(images.shape[0]))
        self.log("train/loss", loss, prog_bar=True)
        self.log_lr()
        return loss

    def validation_step(self, images: torch.Tensor, batch_idx: int) -> None:
        prefix = self.sample_prefix(images.shape[0], torch.Generator().manual_seed(batch_idx))
        self.val_loss.update(self.model.loss(images, prefix_len=prefix), weight=images.shape[0])

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)  # compute() has reduced over ranks
        self.val_loss.reset()
