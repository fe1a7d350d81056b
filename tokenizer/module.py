"""VQGAN training as a LightningModule: L1 + LPIPS + PatchGAN hinge + codebook losses (taming's recipe).

Manual optimisation with two optimisers, generator then discriminator, as taming's VQModel does;
written for Lightning 2, which taming's own module predates.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import lpips
import torch
import torch.nn.functional as F
import torchvision
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from tokenizer.model import VQGAN

log = logging.getLogger(__name__)


def build_lpips(vgg_weights: str | None) -> lpips.LPIPS:
    """LPIPS(vgg) with its VGG16 trunk from `vgg_weights`: a torchvision vgg16 state-dict path, None for
    torchvision's hub cache, or "random" (tests only: random trunk, real LPIPS linear heads)."""
    if vgg_weights is None:
        try:
            return lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
        except Exception as error:
            raise RuntimeError(
                "LPIPS needs torchvision's VGG16 weights (vgg16-397923af.pth) in the torch hub cache "
                f"({torch.hub.get_dir()}/checkpoints), which could not be loaded: {error}. Pass "
                "lpips_vgg_weights=PATH to a local copy, or perceptual_weight=0 to train without LPIPS."
            ) from error
    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if vgg_weights != "random":
        state = torch.load(vgg_weights, map_location="cpu", weights_only=True)
        slices = [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5]
        loaded = 0
        for key, value in state.items():
            parts = key.split(".")  # features.<index>.weight
            if parts[0] != "features":
                continue
            for trunk in slices:
                if parts[1] in trunk._modules:
                    getattr(trunk._modules[parts[1]], parts[2]).data.copy_(value)
                    loaded += 1
        if loaded != 26:  # 13 conv layers x (weight, bias) in the LPIPS trunk
            raise ValueError(f"{vgg_weights} is not a torchvision vgg16 state dict (found {loaded} of 26 trunk tensors)")
    return model.eval().requires_grad_(False)


class VQGANModule(L.LightningModule):
    def __init__(
        self,
        model: str = "vqgan_demo",
        model_overrides: dict | None = None,
        init_from: str | None = None,
        learning_rate: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.9),
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        perceptual_weight: float = 1.0,
        lpips_vgg_weights: str | None = None,
        codebook_weight: float = 1.0,
        disc_start: int = 10_000,
        disc_weight: float = 0.8,
        disc_layers: int = 3,
        export_dir: str | None = None,
        grid_images: int = 8,
    ):
        """`model`: a preset name (see tokenizer.PRESETS), with `model_overrides` applied; `init_from`
        starts from pretrained weights instead. `disc_start`: batches before the PatchGAN joins.
        `l2_weight`: a squared-error term beside L1 (the error PSNR measures; on the demo's flat-colour images
        a plain autoencoder gains ~2 dB after 750 batches with it in place of L1).
        `export_dir` receives save_pretrained at the end of fit."""
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        overrides = model_overrides or {}
        self.vqgan = VQGAN.from_pretrained(init_from, **overrides) if init_from else VQGAN.from_name(model, **overrides)
        self.vqgan.train()
        self.discriminator = NLayerDiscriminator(input_nc=self.vqgan.config.in_channels, n_layers=disc_layers)
        self.discriminator.apply(weights_init)
        self.lpips = build_lpips(lpips_vgg_weights) if perceptual_weight > 0 else None
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.register_buffer("epoch_code_counts", torch.zeros(self.vqgan.config.codebook_size), persistent=False)

    def configure_optimizers(self):
        lr, betas = self.hparams.learning_rate, tuple(self.hparams.betas)
        return (
            torch.optim.Adam(self.vqgan.parameters(), lr=lr, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas),
        )

    def _reconstruction_loss(self, images: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """images/recon in the model's pixel range -> weighted L1 + L2 + LPIPS and its parts."""
        l1, l2 = (images - recon).abs().mean(), (images - recon).pow(2).mean()
        loss, parts = self.hparams.l1_weight * l1 + self.hparams.l2_weight * l2, {"l1": l1, "l2": l2}
        if self.lpips is not None:
            perceptual = self.lpips(self._lpips_range(images), self._lpips_range(recon)).mean()
            loss = loss + self.hparams.perceptual_weight * perceptual
            parts["lpips"] = perceptual
        return loss, parts

    def _lpips_range(self, pixels: torch.Tensor) -> torch.Tensor:
        """Model pixel range -> LPIPS's [-1, 1], without clamping (gradients reach out-of-range values)."""
        low, high = self.vqgan.config.pixel_range
        return (pixels - low) / (high - low) * 2 - 1

    def _adaptive_weight(self, rec_loss: torch.Tensor, gan_loss: torch.Tensor) -> torch.Tensor:
        """taming's balance: scale the GAN gradient at the decoder's last layer to the reconstruction's."""
        last = self.vqgan.decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(gan_loss, last, retain_graph=True)[0]
        weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach() * self.hparams.disc_weight

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        images = self.vqgan.to_model_range(batch)
        recon, codebook_loss, codes = self.vqgan(images)
        self.epoch_code_counts += torch.bincount(codes.flatten(), minlength=self.vqgan.config.codebook_size)
        gan_on = self.global_step // 2 >= self.hparams.disc_start  # global_step counts both optimisers

        rec_loss, parts = self._reconstruction_loss(images, recon)
        loss = rec_loss + self.hparams.codebook_weight * codebook_loss
        if gan_on:
            gan_loss = -self.discriminator(recon).mean()
            weight = self._adaptive_weight(rec_loss, gan_loss)
            loss = loss + weight * gan_loss
            parts.update(gan=gan_loss, gan_weight=weight)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_g.step()

        if gan_on:
            real, fake = self.discriminator(images), self.discriminator(recon.detach())
            disc_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())  # hinge
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(disc_loss)
            opt_d.step()
            parts.update(disc=disc_loss, logits_real=real.mean(), logits_fake=fake.mean())
        else:
            opt_d.step()  # a no-op step keeps both optimisers' step counts (and global_step) in lockstep

        self.log_dict({f"train/{k}": v for k, v in parts.items()}, prog_bar=False)
        self.log("train/codebook_loss", codebook_loss)
        self.log("train/loss", loss, prog_bar=True)

    def on_train_epoch_end(self) -> None:
        counts = self.epoch_code_counts
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        probs = counts / counts.sum().clamp(min=1)
        perplexity = torch.exp(-(probs * probs.clamp(min=1e-12).log()).sum())
        self.log("train/codebook_usage", (counts > 0).float().mean(), prog_bar=True)
        self.log("train/code_perplexity", perplexity)
        self.epoch_code_counts.zero_()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        images = self.vqgan.to_model_range(batch)
        recon_pixels, _, _ = self.vqgan(images)
        recon = self.vqgan.to_unit_range(recon_pixels)
        self.log("val/l1", (batch - recon).abs().mean(), prog_bar=True)
        self.val_psnr(recon, batch)
        self.val_ssim(recon, batch)
        self.log("val/psnr", self.val_psnr)
        self.log("val/ssim", self.val_ssim)
        if self.lpips is not None:
            self.log("val/lpips", self.lpips(batch * 2 - 1, recon * 2 - 1).mean())
        if batch_idx == 0:
            self._save_grid(batch, recon)

    def _save_grid(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        """Originals (top row) over reconstructions (bottom row), as a PNG in the log directory."""
        n = min(len(images), self.hparams.grid_images)
        grid = torchvision.utils.make_grid(torch.cat([images[:n], recon[:n]]), nrow=n, padding=2)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "reconstructions"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step{self.global_step // 2:07d}.png"
        torchvision.utils.save_image(grid, path)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/reconstructions", images=[str(path)], step=self.global_step)

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.vqgan.save_pretrained(self.hparams.export_dir)
            log.info("saved the trained VQGAN to %s", self.hparams.export_dir)
