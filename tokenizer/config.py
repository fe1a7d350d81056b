"""VQGAN shapes as a dataclass with named presets."""

from __future__ import annotations

from dataclasses import dataclass, field

from lvm.config import NamedConfig


@dataclass
class VQGANConfig(NamedConfig):
    """Shape and quantizer options of a VQGAN.

    `pixel_range` is the range the weights were trained on: taming models use [-1, 1], open-muse ones
    (the released LVM tokenizer) [0, 1]. The public API always speaks [0, 1] and converts.
    """

    name: str = "custom"
    resolution: int = 256
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    mid_attention: bool = True
    z_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 1024
    commitment: float = 0.25
    dropout: float = 0.0
    # GroupNorm groups in the encoder and decoder. taming's 32 makes each group a single channel at a
    # 32-channel width (per-channel normalisation); 1 normalises over all channels jointly. On the demo's
    # images 1 did not help (400 batches: 15.2 dB against 16.4 with 32), so taming's stays the default.
    norm_groups: int = 32
    pixel_range: tuple[float, float] = (-1.0, 1.0)
    # Quantizer options beyond taming's; off for loaded checkpoints.
    l2_normalized_codes: bool = False  # cosine-similarity lookup, as LlamaGen
    dead_code_threshold: float = 0.0  # restart codes whose EMA use per batch falls below this; 0 = off
    extra: dict = field(default_factory=dict)  # provenance notes (source format, original config)

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        self.pixel_range = tuple(float(v) for v in self.pixel_range)
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsample factor "
                f"{self.downsample_factor} of channel_mult {self.channel_mult}"
            )
        for width in (self.base_channels * m for m in self.channel_mult):
            if width % self.norm_groups:
                raise ValueError(
                    f"channel width {width} (base_channels x channel_mult) is not a multiple of "
                    f"norm_groups {self.norm_groups}, which GroupNorm in the taming blocks needs"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.latent_size**2

_TAMING_IMAGENET = dict(
    resolution=256,
    base_channels=128,
    channel_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    attn_resolutions=(16,),
    mid_attention=True,
    z_channels=256,
    embed_dim=256,
    pixel_range=(-1.0, 1.0),
)

PRESETS: dict[str, VQGANConfig] = {
    p.name: p
    for p in (
        # The released LVM tokenizer (open-muse VQGAN f16, 8192 codes): no attention anywhere, [0, 1] pixels.
        VQGANConfig(
            "vqgan_f16_8192", resolution=256, base_channels=128, channel_mult=(1, 2, 2, 4, 6), num_res_blocks=2,
            attn_resolutions=(), mid_attention=False, z_channels=64, embed_dim=64, codebook_size=8192,
            pixel_range=(0.0, 1.0),
        ),
        # taming-transformers' ImageNet models.
        VQGANConfig("vqgan_imagenet_f16_1024", codebook_size=1024, **_TAMING_IMAGENET),
        VQGANConfig("vqgan_imagenet_f16_16384", codebook_size=16384, **_TAMING_IMAGENET),
        # Demo: 32x32 images, f4 -> 64 tokens per image, a 512-code book that trains on 2 CPU cores in minutes.
        # No dead-code restarts: on flat-colour images they spread one background over many codes (26 distinct
        # codes for ~31 background patches of a scene, against 12 without), which the LVM then has to learn;
        # without them the demo LVM's changed-token accuracy rose from 0.24 to 0.33-0.45 (three tokenizer runs)
        # for about 1 dB of PSNR.
        VQGANConfig(
            "vqgan_demo", resolution=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
            attn_resolutions=(), mid_attention=False, z_channels=32, embed_dim=16, codebook_size=512,
            pixel_range=(-1.0, 1.0), l2_normalized_codes=True,
        ),
        # Tests: the smallest shape that exercises every block kind (attention included).
        VQGANConfig(
            "vqgan_tiny", resolution=32, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(16,), mid_attention=True, z_channels=16, embed_dim=8, codebook_size=64,
            pixel_range=(-1.0, 1.0),
        ),
    )
}  # fmt: skip
VQGANConfig.presets = PRESETS
