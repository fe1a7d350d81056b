"""AIM (El-Nouby et al., "Scalable Pre-training of Large Autoregressive Image Models", arXiv 2401.08541;
code apple/ml-aim, aim-v1) on the LVM's trunk: next-patch regression on pixels instead of next-code
classification on VQGAN tokens.

    pixel_values [B, 3, H, W] -> patchify (raster order) [B, N, p*p*3] -> Linear -> RMSNorm -> + sin-cos
    -> num_layers x lvm.model.Block (prefix-causal attention, no rotary) -> RMSNorm      = features [B, N, C]
    -> pixel head: Linear -> + sin-cos -> head_blocks x (x + SwiGLU(RMSNorm(x))) -> RMSNorm -> Linear
    = predictions [B, N, p*p*3]: position i predicts patch i + 1 (the last position predicts nothing)

Where we differ from ml-aim's ViT and why: the blocks are the LVM's (RMSNorm for LayerNorm, SwiGLU of
width 8d/3 for GELU MLP of width 4d: the same 8d^2 weights per block), so both objectives train the very
same trunk. ml-aim's released code is inference only: it has neither the pixel head nor the loss; the
head here is the paper's (section 3: MLP blocks applied to each patch independently, sin-cos positions
added before it, expansion 4, no biases).

Prefix attention (paper section 3, ml-aim layers.PrefixCausalAttention): the first k patches see each other
both ways, later ones causally; the loss is taken on patches k..N-1 only, and downstream the trunk runs
fully bidirectional (`features`). N patches, C hidden, P = p*p*3 values per patch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lvm import attention
from lvm.checkpoints import check_state_dict, read_state_dict, save_pretrained_dir
from lvm.config import ATTN_BACKENDS, LVMConfig, NamedConfig
from lvm.model import Block, RMSNorm, SwiGLU

CHANNELS = 3


@dataclass
class AIMConfig(NamedConfig):
    """Shapes of an AIM. `intermediate_size=None` is round(8/3 hidden): SwiGLU's three matrices then hold
    as many weights as ml-aim's GELU MLP of ratio 4 (rounding up to a multiple would break that)."""

    name: str = "custom"
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1536
    num_layers: int = 24
    num_heads: int = 12
    intermediate_size: int | None = None
    head_blocks: int = 12  # MLP blocks of the pixel head (the paper's N)
    head_width: int = 2048
    norm_eps: float = 1e-6  # ml-aim's LayerNorm eps
    init_std: float = 0.02
    attn_backend: str = "auto"  # auto | xformers | sdpa | flex | eager, see lvm/attention.py

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = round(8 * self.hidden_size / 3)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_patches < 2:
            raise ValueError(f"{self.num_patches} patch: next-patch prediction needs at least 2; lower patch_size")
        for width, what in ((self.hidden_size, "hidden_size"), (self.head_width, "head_width")):
            if width % 4:
                raise ValueError(f"{what} {width} must be a multiple of 4 for 2-D sin-cos positions")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend {self.attn_backend!r} is not one of {ATTN_BACKENDS}")
        self.trunk_config()  # heads must divide hidden: LVMConfig says so

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * CHANNELS

    def trunk_config(self) -> LVMConfig:
        """The LVMConfig whose Blocks make the trunk (vocab fields unused: AIM has no token table)."""
        return LVMConfig(
            name=self.name, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_layers=self.num_layers, num_heads=self.num_heads, rms_norm_eps=self.norm_eps,
            init_std=self.init_std, attn_backend=self.attn_backend,
        )  # fmt: skip

    def head_config(self) -> LVMConfig:
        """The shape of the pixel head's SwiGLU blocks: width head_width, expansion 8/3 (ratio 4's weights)."""
        return dataclasses.replace(
            self.trunk_config(), hidden_size=self.head_width, intermediate_size=round(8 * self.head_width / 3),
            num_heads=1, num_kv_heads=1,
        )


PRESETS: dict[str, AIMConfig] = {
    c.name: c
    for c in (
        # ml-aim aim-v1 models.py: patch 14 at 224 (256 patches), MLP ratio 4, no biases, final norm.
        AIMConfig("aim_600m", hidden_size=1536, num_layers=24, num_heads=12),
        AIMConfig("aim_1b", hidden_size=2048, num_layers=24, num_heads=16),
        AIMConfig("aim_3b", hidden_size=3072, num_layers=24, num_heads=24),
        AIMConfig("aim_7b", hidden_size=4096, num_layers=32, num_heads=32),
        # CPU demo: 32x32 images (the demo tokenizer's) in 64 patches of 4x4.
        AIMConfig("aim_demo", image_size=32, patch_size=4, hidden_size=128, num_layers=4, num_heads=4,
                  head_blocks=1, head_width=128),  # fmt: skip
        # Tests: 16 patches, two layers.
        AIMConfig("aim_tiny", image_size=16, patch_size=4, hidden_size=64, num_layers=2, num_heads=4,
                  head_blocks=1, head_width=32),  # fmt: skip
    )
}
AIMConfig.presets = PRESETS


# -- pixels and positions -------------------------------------------------------------------------------
def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, p*p*3]: patches row by row, inside a patch the values in (row, col, channel) order."""
    batch, channels, height, width = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(batch, channels, height // p, p, width // p, p)  # [B, c, gh, row, gw, col]
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's per-patch target normalisation: (x - mean) / sqrt(var + eps), unbiased variance over each patch."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as MAE's torch .var()
    return (patches - mean) / (var + eps).sqrt()


def sincos_positions(grid_size: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] 2-D sin-cos embeddings in raster order, as ml-aim's SinCosPosEmbed (MAE's): the first
    half encodes the column, the second the row, each as (sin, cos) of position * 10000^(-i / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")

    def encode(position: torch.Tensor) -> torch.Tensor:
        angles = position.reshape(-1, 1).double() * omega  # [N, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


# -- model ---------------------------------------------------------------------------------------------
class AIM(nn.Module):
    def __init__(self, config: AIMConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False  # a training switch, as LVM.activation_checkpointing
        trunk, head = config.trunk_config(), config.head_config()
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        self.patch_norm = RMSNorm(config.hidden_size, config.norm_eps)  # ml-aim's PatchEmbed norm_layer
        self.layers = nn.ModuleList(Block(trunk) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.head_in = nn.Linear(config.hidden_size, config.head_width, bias=False)
        self.head_norms = nn.ModuleList(RMSNorm(config.head_width, config.norm_eps) for _ in range(config.head_blocks))
        self.head_mlps = nn.ModuleList(SwiGLU(head) for _ in range(config.head_blocks))
        self.head_norm = RMSNorm(config.head_width, config.norm_eps)
        self.head_out = nn.Linear(config.head_width, config.patch_dim, bias=False)
        # Fixed, not learnt (ml-aim's sincos): buffers left out of checkpoints.
        self.register_buffer("positions", sincos_positions(config.grid_size, config.hidden_size), persistent=False)
        self.register_buffer("head_positions", sincos_positions(config.grid_size, config.head_width), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def _check(self, pixel_values: torch.Tensor) -> None:
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (CHANNELS, size, size):
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)}: {self.config.name} takes [B, 3, {size}, {size}]; "
                "resize the images (tokenizer.to_tensor(images, resolution)) or set image_size"
            )

    def trunk(self, pixel_values: torch.Tensor, prefix_len: int | torch.Tensor,
              layers: Sequence[int] | None = None) -> torch.Tensor:  # fmt: skip
        """[B, 3, H, W] -> final-norm hidden states [B, N, C] under a prefix-causal mask of `prefix_len`
        (an int, or long [B]); with `layers`, the mean of those blocks' outputs instead (ml-aim's AverageLayers)."""
        self._check(pixel_values)
        x = self.patch_norm(self.patch_embed(patchify(pixel_values, self.config.patch_size))) + self.positions
        attend = attention.build(self.config.attn_backend, None, x.shape[1], x.device, prefix_len=prefix_len)
        outputs = []
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, None, None, attend, use_reentrant=False)
            else:
                x = block(x, None, None, attend)  # no rotary: positions are in x
            outputs.append(x)
        if layers is None:
            return self.norm(x)
        return torch.stack([outputs[i] for i in layers]).mean(0)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> predicted normalised pixels [B, N, P], each position on its own."""
        x = self.head_in(hidden) + self.head_positions
        for norm, mlp in zip(self.head_norms, self.head_mlps, strict=True):
            x = x + mlp(norm(x))
        return self.head_out(self.head_norm(x))

    def forward(self, pixel_values: torch.Tensor, prefix_len: int | torch.Tensor = 1) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> predictions [B, N, P]; position i predicts patch i + 1.
        `prefix_len` k in 1..N: patches 0..k-1 attend bidirectionally (k = 1: plain causal)."""
        self._check_prefix(prefix_len, self.config.num_patches)
        return self.head(self.trunk(pixel_values, prefix_len))

    def loss(self, pixel_values: torch.Tensor, prefix_len: int | torch.Tensor = 1) -> torch.Tensor:
        """AIM's objective: mean squared error between the predictions at positions k-1..N-2 and the
        normalised patches k..N-1. Each target patch is normalised on its own as MAE does (mean and unbiased
        variance over its p*p*3 values, eps 1e-6), from `pixel_values` exactly as passed; the error is
        averaged over a patch's values, then over all target patches of the batch.

        ml-aim ships no loss code: this is the paper's objective (section 4, figure 2: the L2 "normalized
        pixel-level regression", prefix patches not predicted) with MAE's normalisation.
        `prefix_len`: an int in 1..N-1, or long [B] (one per image, as training samples them)."""
        n = self.config.num_patches
        self._check_prefix(prefix_len, n - 1)
        predictions = self(pixel_values, prefix_len)[:, :-1]  # [B, N-1, P], predicting patches 1..N-1
        targets = normalise_patches(patchify(pixel_values, self.config.patch_size).float())[:, 1:]
        error = (predictions.float() - targets).pow(2).mean(dim=-1)  # [B, N-1]
        prefix = torch.as_tensor(prefix_len, device=error.device).reshape(-1, 1)  # [B or 1, 1]
        trained = torch.arange(1, n, device=error.device)[None] >= prefix  # target patch index >= k
        trained = trained.expand_as(error)
        return (error * trained).sum() / trained.sum()

    def features(self, pixel_values: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, C] with full bidirectional attention, as AIM uses its trunk downstream.
        `layers` (e.g. the last 6, ml-aim's probe_layers) averages those blocks' outputs instead."""
        return self.trunk(pixel_values, self.config.num_patches, layers)

    @staticmethod
    def _check_prefix(prefix_len: int | torch.Tensor, highest: int) -> None:
        low, high = (prefix_len, prefix_len) if isinstance(prefix_len, int) else (int(prefix_len.min()), int(prefix_len.max()))
        if low < 1 or high > highest:
            raise ValueError(f"prefix_len must lie in 1..{highest}, got {prefix_len}")

    # -- sizes -------------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False, trunk_only: bool = False) -> int:
        """All parameters, or the trunk's alone (blocks + final norm), the count ml-aim's model names refer
        to. AIM has no lookup table (every parameter is a matmul weight or a norm gain), so non_embedding,
        there for the LVM's signature that lvm.scaling calls, changes nothing."""
        modules = [*self.layers, self.norm] if trunk_only else [self]
        return sum(p.numel() for m in modules for p in m.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per patch: 6 * params plus the attention products, as LVM.flops_per_token."""
        c = self.config
        return 6 * self.num_params() + 12 * c.num_layers * c.hidden_size * (seq_len or c.num_patches)

    # -- checkpoints: config.json + model.safetensors (lvm/checkpoints.py) ----------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        save_pretrained_dir(directory, self.config.to_dict(), self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides) -> AIM:
        """A directory save_pretrained wrote; `overrides` replace config fields (e.g. attn_backend)."""
        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"{directory} has no config.json: not a directory AIM.save_pretrained wrote")
        model = cls(AIMConfig.from_dict({**json.loads((directory / "config.json").read_text()), **overrides}))
        state = read_state_dict(directory)
        check_state_dict(model.state_dict(), state, str(directory), hint="was it saved with other AIMConfig fields?")
        model.load_state_dict(state)
        return model
