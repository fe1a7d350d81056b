"""VQGAN: taming-transformers' encoder and decoder around our quantizer, with a [0, 1] image API."""

from __future__ import annotations

import contextlib
import io
import os

import torch
from taming.modules.diffusionmodules.model import Decoder, Encoder
from torch import nn

from lvm.checkpoints import save_pretrained_dir
from tokenizer.config import VQGANConfig
from tokenizer.quantizer import Quantizer


def taming_encoder_decoder(config: VQGANConfig) -> tuple[Encoder, Decoder]:
    """taming's Encoder and Decoder in the shape of `config` (mid-block attention replaced by identity
    when `mid_attention` is off, the layout of the released LVM tokenizer)."""
    shape = dict(
        ch=config.base_channels,
        out_ch=config.in_channels,
        ch_mult=config.channel_mult,
        num_res_blocks=config.num_res_blocks,
        attn_resolutions=config.attn_resolutions,
        dropout=config.dropout,
        in_channels=config.in_channels,
        resolution=config.resolution,
        z_channels=config.z_channels,
        double_z=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints its latent shape
        encoder, decoder = Encoder(**shape), Decoder(**shape)
    if not config.mid_attention:
        encoder.mid.attn_1 = nn.Identity()
        decoder.mid.attn_1 = nn.Identity()
    if config.norm_groups != 32:  # taming hard-codes 32 groups; same parameters, another grouping
        for network in (encoder, decoder):
            for name, module in list(network.named_modules()):
                if isinstance(module, nn.GroupNorm):
                    network.set_submodule(name, nn.GroupNorm(config.norm_groups, module.num_channels, module.eps))
    return encoder, decoder


class VQGAN(nn.Module):
    """Images <-> discrete codes.

    Module names are taming's `VQModel` ones (`encoder`, `quant_conv`, `quantize`, `post_quant_conv`,
    `decoder`), so taming and open-muse state dicts load without renaming.

        codes = vq.encode(images)   # float [B, 3, H, W] in [0, 1] -> long [B, (H/f) * (W/f)], row-major
        images = vq.decode(codes)   # long [B, n] -> float [B, 3, H, W] in [0, 1]
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = taming_encoder_decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = Quantizer(
            config.codebook_size,
            config.embed_dim,
            commitment=config.commitment,
            l2_normalized=config.l2_normalized_codes,
            dead_code_threshold=config.dead_code_threshold,
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        # oneDNN and cuDNN convolutions run faster on NHWC; parameters keep this layout through loads
        self.to(memory_format=torch.channels_last)

    @classmethod
    def from_name(cls, name: str, **overrides) -> VQGAN:
        return cls(VQGANConfig.from_name(name, **overrides))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> VQGAN:
        """Load our own directory, a taming-transformers `.ckpt` (or its run folder), or an open-muse folder."""
        from tokenizer.checkpoints import load_pretrained

        return load_pretrained(path, **overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors`, each atomically."""
        save_pretrained_dir(directory, {"model_type": "lvm-vqgan", **self.config.to_dict()}, self.state_dict())

    # -- pixels -----------------------------------------------------------------------------------
    def to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self.config.pixel_range
        return images * (high - low) + low

    def to_unit_range(self, pixels: torch.Tensor) -> torch.Tensor:
        low, high = self.config.pixel_range
        return ((pixels - low) / (high - low)).clamp(0, 1)

    # -- training path (pixels in the model's range) ------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels [B, 3, H, W] -> (reconstruction, codebook loss, codes [B, h*w])."""
        quantized, codebook_loss, codes = self.quantize(self.quant_conv(self.encoder(pixels)))
        return self.decoder(self.post_quant_conv(quantized)), codebook_loss, codes

    # -- public API (images in [0, 1]) ----------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [0, 1] -> long [B, (H/f) * (W/f)] codes, row-major."""
        self._check_images(images)
        with torch.inference_mode():
            pixels = self.to_model_range(images.to(self.quant_conv.weight.device, self._param_dtype()))
            latents = self.quant_conv(self.encoder(pixels.contiguous(memory_format=torch.channels_last)))
            codes = self.quantize.codes(latents)
        return codes.clone()  # a normal tensor, usable outside inference mode

    def decode(self, codes: torch.Tensor, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """long [B, n] codes -> float [B, 3, H, W] in [0, 1]. A square latent grid unless `latent_hw`."""
        height, width = self._check_codes(codes, latent_hw)
        with torch.inference_mode():
            latents = self.quantize.lookup(codes.to(self.quantize.embedding.weight.device, torch.long), height, width)
            latents = latents.contiguous(memory_format=torch.channels_last)
            images = self.to_unit_range(self.decoder(self.post_quant_conv(latents)).float())
        return images.clone()

    def _param_dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _check_images(self, images: torch.Tensor) -> None:
        factor = self.config.downsample_factor
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(
                f"encode expects a float tensor [B, 3, H, W] in [0, 1]; got "
                f"{type(images).__name__} {getattr(images, 'dtype', '')}. Convert uint8 images with x.float() / 255."
            )
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"encode expects images of shape [B, {self.config.in_channels}, H, W]; got {tuple(images.shape)}"
            )
        if images.shape[2] % factor or images.shape[3] % factor:
            raise ValueError(
                f"image height and width must be multiples of the downsample factor {factor}; got "
                f"{tuple(images.shape[2:])}. Resize with tokenizer.fit_to_resolution (model resolution "
                f"{self.config.resolution})."
            )
        if images.shape[0] == 0:
            raise ValueError("encode got an empty batch (shape [0, ...])")
        if not torch.isfinite(images).all():
            raise ValueError("encode got NaN or infinite pixel values")
        low, high = float(images.min()), float(images.max())
        if low < -1e-4 or high > 1 + 1e-4:
            raise ValueError(
                f"encode expects pixel values in [0, 1]; got values in [{low:.3f}, {high:.3f}]. "
                "For [-1, 1] data use (x + 1) / 2; for uint8 data use x / 255."
            )

    def _check_codes(self, codes: torch.Tensor, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise TypeError(f"decode expects an integer tensor [B, n] of codes; got {getattr(codes, 'dtype', type(codes))}")
        if codes.ndim != 2:
            raise ValueError(f"decode expects codes of shape [B, n]; got {tuple(codes.shape)}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.config.codebook_size:
            raise ValueError(
                f"codes must lie in [0, {self.config.codebook_size - 1}] (codebook size "
                f"{self.config.codebook_size}); got values in [{low}, {high}]. Special tokens (BOS/EOS) "
                "must be removed before decoding."
            )
        n = codes.shape[1]
        if latent_hw is None:
            side = round(n**0.5)
            if side * side != n:
                raise ValueError(f"{n} codes per image do not form a square grid; pass latent_hw=(h, w)")
            return side, side
        if latent_hw[0] * latent_hw[1] != n:
            raise ValueError(f"latent_hw {latent_hw} holds {latent_hw[0] * latent_hw[1]} codes; got {n} per image")
        return latent_hw

