"""Vector quantizer: taming's VectorQuantizer2 plus l2-normalised codes and dead-code restart."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from taming.modules.vqvae.quantize import VectorQuantizer2


class Quantizer(VectorQuantizer2):
    """Nearest-neighbour lookup into a codebook of `codebook_size` vectors of size `dim`.

    With default options this is taming's quantizer: the same parameter (`embedding.weight`), the same
    distance arithmetic (so loaded checkpoints give the codes they gave in taming). Two options help a
    codebook trained from scratch use all of its codes:
    - `l2_normalized`: compare directions, not lengths (LlamaGen reports 97% codebook use with it);
    - `dead_code_threshold`: codes whose moving-average use per batch falls below the threshold are
      moved onto random encoder outputs of the current batch. A fresh codebook starts with zero use,
      so the first training batch initialises the whole codebook from data.
    """

    usage_decay = 0.95

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        commitment: float = 0.25,
        l2_normalized: bool = False,
        dead_code_threshold: float = 0.0,
    ):
        super().__init__(codebook_size, dim, beta=commitment, legacy=False)
        self.l2_normalized = l2_normalized
        self.dead_code_threshold = dead_code_threshold
        self.register_buffer("usage", torch.zeros(codebook_size), persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # loaded codes get the grace period; only a fresh codebook is initialised from data
        self.usage.fill_(1.0)

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=1) if self.l2_normalized else weight

    def nearest_code(self, flat: torch.Tensor) -> torch.Tensor:
        """[N, dim] -> [N] indices of the closest codes, always in fp32: under bf16 autocast (8 bits of
        mantissa) distances would pick another code wherever the two nearest are close."""
        with torch.autocast(flat.device.type, enabled=False):
            return self._nearest_code_fp32(flat.float())

    def _nearest_code_fp32(self, flat: torch.Tensor) -> torch.Tensor:
        codebook = self.codebook().float()
        if self.l2_normalized:
            return (flat @ codebook.t()).argmax(dim=1)
        # taming's arithmetic, term for term, so imported models reproduce their codes exactly
        distance = (
            flat.pow(2).sum(dim=1, keepdim=True)
            + codebook.pow(2).sum(dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, codebook.t())
        )
        return distance.argmin(dim=1)

    def flatten(self, z: torch.Tensor) -> torch.Tensor:
        """[B, dim, h, w] -> [B*h*w, dim] vectors in the space the codebook lives in."""
        flat = rearrange(z, "b d h w -> (b h w) d").contiguous()
        return F.normalize(flat, dim=1) if self.l2_normalized else flat

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """[B, dim, h, w] -> codes [B, h*w]; no loss, no usage bookkeeping."""
        return self.nearest_code(self.flatten(z)).view(z.shape[0], -1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, dim, h, w] -> (quantized z [B, dim, h, w], codebook + commitment loss, codes [B, h*w])."""
        batch, _, height, width = z.shape
        flat = self.flatten(z)
        if self.training and self.dead_code_threshold > 0:
            self._restart_dead_codes(flat.detach())
        indices = self.nearest_code(flat)
        quantized = self.codebook()[indices]
        loss = F.mse_loss(quantized, flat.detach()) + self.beta * F.mse_loss(flat, quantized.detach())
        quantized = flat + (quantized - flat).detach()  # straight-through gradient to the encoder
        if self.training:
            self._update_usage(indices)
        quantized = rearrange(quantized, "(b h w) d -> b d h w", b=batch, h=height, w=width)
        return quantized, loss, indices.view(batch, height * width)

    def lookup(self, codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """codes [B, h*w] -> code vectors [B, dim, h, w]."""
        vectors = self.codebook()[codes]
        return rearrange(vectors, "b (h w) d -> b d h w", h=height, w=width)

    @torch.no_grad()
    def _update_usage(self, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.n_e).to(self.usage.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)  # every rank keeps the same usage, so restarts agree
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = self.usage < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        replacements = flat[torch.randint(len(flat), (n_dead,), device=flat.device)]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(replacements, src=0)
        self.embedding.weight.data[dead] = replacements.to(self.embedding.weight.dtype)
        self.usage[dead] = 1.0  # a grace period before a restarted code can be judged dead again
