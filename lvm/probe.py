"""AIM's attentive probe on frozen features: one probe for every encoder, so objectives compare on equal terms.

    encoder(pixels [B, 3, H, W] in [0, 1]) -> features [B, N, C]   (anything callable; VisionFeatures too)
        aim_encoder(aim)            AIM's bidirectional trunk (optionally averaging blocks, as ml-aim's probe)
        lvm_encoder(lvm, vqgan)     the LVM's final hidden states over an image's tokens (BOS first)
        vlm.encoders.build_encoder  any VLM vision tower (its VisionFeatures.features are taken)
    features = extract(encoder, images)             frozen: computed once, no gradients
    probe = fit_probe(features, labels, classes)    AttentiveProbe trained with AdamW
    top1 = accuracy(probe, test_features, test_labels)

AttentiveProbe is ml-aim's AttentionPoolingClassifier (aim-v1 layers.py): a parameter-free BatchNorm over
the channels, a learnt query attending over the N feature tokens (keys and values projected, no biases),
then a linear classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Encoder = Callable[[torch.Tensor], torch.Tensor]


class AttentiveProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_heads: int = 8, num_queries: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"feature width {dim} is not divisible by the probe's num_heads {num_heads}")
        self.num_heads = num_heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """features [B, N, C] -> logits [B, classes]."""
        batch, length, dim = x.shape
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, H, L, C/H]
            return t.reshape(batch, t.shape[1], self.num_heads, dim // self.num_heads).transpose(1, 2)

        q = heads(self.query.expand(batch, -1, -1))
        pooled = F.scaled_dot_product_attention(q, heads(self.k(x)), heads(self.v(x)))  # [B, H, Q, C/H]
        pooled = pooled.transpose(1, 2).reshape(batch, -1, dim).mean(dim=1)  # the queries averaged
        return self.linear(pooled)


# -- encoders --------------------------------------------------------------------------------------------
def aim_encoder(model, layers: Sequence[int] | None = None) -> Encoder:
    """AIM's frozen trunk, bidirectional (AIM.features); `layers` averages those blocks as ml-aim's probe does."""
    return lambda pixels: model.features(pixels, layers)


def lvm_encoder(model, tokenizer, use_bos: bool = True) -> Encoder:
    """The LVM's final-norm hidden states over one image's tokens: the image is encoded by `tokenizer`
    (a VQGAN at the images' resolution) and read as a one-image visual sentence, BOS first (dropped from
    the features), as the LVM was trained."""

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != tokenizer.config.resolution:
            raise ValueError(
                f"images of {pixels.shape[-1]} pixels, the tokenizer takes {tokenizer.config.resolution}: "
                "generate the probe data at the tokenizer's resolution"
            )
        codes = tokenizer.encode(pixels)  # [B, n]
        if not use_bos:
            return model.hidden_states(codes)
        bos = torch.full_like(codes[:, :1], model.config.bos_id)
        return model.hidden_states(torch.cat([bos, codes], dim=1))[:, 1:]

    return encode


@torch.no_grad()
def extract(encoder: Encoder, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Frozen features [n, N, C] of images [n, 3, H, W], in batches, on the CPU."""
    outputs = []
    for start in range(0, len(images), batch_size):
        out = encoder(images[start : start + batch_size])
        outputs.append((out.features if hasattr(out, "features") else out).float().cpu())
    return torch.cat(outputs)


# -- training and scoring ----------------------------------------------------------------------------------
def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 60,
              batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 0.1, num_heads: int = 8,
              seed: int = 0) -> AttentiveProbe:  # fmt: skip
    """Train an AttentiveProbe on frozen features [n, N, C] with AdamW and a cosine schedule."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = AttentiveProbe(features.shape[-1], num_classes, num_heads=min(num_heads, features.shape[-1]))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(features) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if len(rows) < 2:  # BatchNorm needs two rows to take statistics from
                continue
            loss = F.cross_entropy(probe(features[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return probe.eval()


@torch.no_grad()
def accuracy(probe: AttentiveProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of the probe on features [n, N, C]."""
    return float((probe.eval()(features).argmax(dim=-1) == labels).float().mean())


def probe_top1(encoder: Encoder, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
               num_classes: int, **fit_options) -> float:  # fmt: skip
    """Top-1 on `test` (images, labels) of a probe fitted on `train` over the encoder's frozen features."""
    probe = fit_probe(extract(encoder, train[0]), train[1], num_classes, **fit_options)
    return accuracy(probe, extract(encoder, test[0]), test[1])
