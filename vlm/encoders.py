"""Vision encoders behind one small protocol: pixels [B, 3, H, W] -> `VisionFeatures` (features [B, N, C],
their grid (h, w) with N = h * w, and, for towers that take padded images, a patch mask [B, N]).

    encoder = build_encoder({"kind": "hf", "config": clip_vision_config_dict, "feature_layer": -2})
    out = encoder(pixel_values)            # out.features [B, N, C], out.grid (h, w), out.mask or None
    encoder.out_dim                        # C

Kinds (the `kind` of a spec; the rest of the spec is the kind's options, and is what a saved VLM's
config.json records to rebuild the encoder):
    hf         a transformers vision tower: CLIP, SigLIP, InternVL's, Idefics2's (built from a config dict
               or a local directory `path`); LLaVA's feature-layer choice and CLS handling
    timm       a timm ViT (model_name + model_kwargs; random init or a local `checkpoint` file)
    open_clip  an open_clip visual tower (model_name + model_kwargs; random init or a local `checkpoint`)
    vqgan      our tokenizer's encoder: pre-quantisation features, or the codes embedded through the frozen
               codebook and a learned projection (as DeLVM embeds codes), so an LVM tokenizer is the eye
    dual       POINTS' dual encoder: a general and a document tower, features averaged with weights
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class VisionFeatures(NamedTuple):
    features: torch.Tensor  # [B, N, C]
    grid: tuple[int, int]  # (h, w) of the patch grid; N = h * w once any CLS token is dropped
    mask: torch.Tensor | None = None  # bool [B, N]: False on patches of padding (Idefics2), else None


# -- transformers towers ---------------------------------------------------------------------------
# model_type of the vision config -> (class name in transformers, has a CLS token in front of the patches)
HF_TOWERS = {
    "clip_vision_model": ("CLIPVisionModel", True),
    "siglip_vision_model": ("SiglipVisionModel", False),
    "janus_vision_model": ("JanusVisionModel", False),
    "internvl_vision": ("InternVLVisionModel", True),
    "idefics2_vision": ("Idefics2VisionTransformer", False),
}


# The normalisation each tower family was trained with (CLIP's statistics, ImageNet's for InternViT).
HF_NORMALISATION = {
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "internvl_vision": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class HFVisionEncoder(nn.Module):
    """A transformers vision tower. `feature_layer` indexes the tower's hidden states (LLaVA takes the
    penultimate, -2; -1 is the tower's last_hidden_state, as InternVL reads it); `select` "default" drops
    the CLS token where the tower has one, "full" keeps it (then N = h * w + 1)."""

    def __init__(self, config: dict | None = None, feature_layer: int = -2, select: str = "default",
                 path: str | None = None):
        super().__init__()
        import transformers

        if path is not None:  # a local transformers directory: its config.json says which tower
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
        model_type = (config or {}).get("model_type")
        if model_type not in HF_TOWERS:
            raise ValueError(f"unknown transformers vision tower {model_type!r}; valid: {', '.join(HF_TOWERS)}")
        if select not in ("default", "full"):
            raise ValueError(f"select must be 'default' (drop CLS) or 'full' (keep it), got {select!r}")
        class_name, self.has_cls = HF_TOWERS[model_type]
        tower_class = getattr(transformers, class_name, None) or _idefics2_tower()
        if path is not None:
            self.tower = tower_class.from_pretrained(path)
        else:
            config_class = transformers.AutoConfig.for_model(model_type).__class__
            self.tower = tower_class._from_config(config_class(**_without_meta(config)))
        self.tower_type, self.feature_layer, self.select = model_type, feature_layer, select
        tower_config = self.tower.config
        self.patch_size = _pair(tower_config.patch_size)[0]
        self.image_size = _pair(tower_config.image_size)[0]
        self.out_dim = tower_config.hidden_size
        self.pixel_mean, self.pixel_std = HF_NORMALISATION.get(model_type, ((0.5,) * 3, (0.5,) * 3))

    def spec(self) -> dict:
        return {"kind": "hf", "config": self.tower.config.to_dict(), "feature_layer": self.feature_layer, "select": self.select}

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None) -> VisionFeatures:
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        if self.tower_type == "idefics2_vision":
            return self._idefics2(pixel_values, pixel_attention_mask, grid)
        out = self.tower(pixel_values=pixel_values, output_hidden_states=self.feature_layer != -1, return_dict=True)
        hidden = out.last_hidden_state if self.feature_layer == -1 else out.hidden_states[self.feature_layer]
        if self.has_cls and self.select == "default":
            hidden = hidden[:, 1:]
        return VisionFeatures(hidden, grid)

    def _idefics2(self, pixel_values, pixel_attention_mask, grid) -> VisionFeatures:
        """Idefics2 pads images to a common size: a patch is real when all its pixels are."""
        batch, _, height, width = pixel_values.shape
        if pixel_attention_mask is None:
            pixel_attention_mask = torch.ones(batch, height, width, dtype=torch.bool, device=pixel_values.device)
        p = self.patch_size
        patches = pixel_attention_mask.unfold(1, p, p).unfold(2, p, p)  # [B, h, w, p, p]
        patch_mask = patches.sum(dim=(-1, -2)) == p * p  # [B, h, w]
        out = self.tower(pixel_values=pixel_values, patch_attention_mask=patch_mask, return_dict=True)
        return VisionFeatures(out.last_hidden_state, grid, patch_mask.view(batch, -1))


def _idefics2_tower():
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    return Idefics2VisionTransformer


def _without_meta(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "architectures")}


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


# -- timm and open_clip ------------------------------------------------------------------------------
class TimmEncoder(nn.Module):
    """A timm ViT's patch tokens (prefix tokens such as CLS and registers dropped)."""

    def __init__(self, model_name: str, model_kwargs: dict | None = None, checkpoint: str | None = None):
        super().__init__()
        import timm

        self.model_name, self.model_kwargs = model_name, dict(model_kwargs or {})
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **self.model_kwargs)
        if checkpoint is not None:
            timm.models.load_checkpoint(self.model, checkpoint)
        self.out_dim = self.model.num_features
        self.image_size = _pair(self.model.patch_embed.img_size)[0]
        self.patch_size = _pair(self.model.patch_embed.patch_size)[0]
        self.pixel_mean = self.model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))
        self.pixel_std = self.model.pretrained_cfg.get("std", (0.229, 0.224, 0.225))

    def spec(self) -> dict:
        return {"kind": "timm", "model_name": self.model_name, "model_kwargs": self.model_kwargs}

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        tokens = self.model.forward_features(pixel_values)[:, self.model.num_prefix_tokens :]  # [B, N, C]
        grid = self.model.patch_embed.dynamic_feat_size(pixel_values.shape[-2:])
        return VisionFeatures(tokens, tuple(grid))


class OpenClipEncoder(nn.Module):
    """An open_clip visual tower's patch tokens (after its final LayerNorm, before the projection)."""

    def __init__(self, model_name: str, model_kwargs: dict | None = None, checkpoint: str | None = None):
        super().__init__()
        import open_clip

        self.model_name, self.model_kwargs = model_name, dict(model_kwargs or {})
        clip = open_clip.create_model(model_name, pretrained=checkpoint, **self.model_kwargs)
        self.visual = clip.visual
        self.visual.output_tokens = True
        self.patch_size = _pair(self.visual.patch_size)[0]
        self.image_size = _pair(self.visual.image_size)[0]
        self.out_dim = self.visual.transformer.width
        self.pixel_mean = getattr(self.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        self.pixel_std = getattr(self.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD

    def spec(self) -> dict:
        return {"kind": "open_clip", "model_name": self.model_name, "model_kwargs": self.model_kwargs}

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        _, tokens = self.visual(pixel_values)  # [B, N, width]
        return VisionFeatures(tokens, (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size))


# -- our VQGAN ---------------------------------------------------------------------------------------
class VQGANEncoder(nn.Module):
    """The project's tokenizer as a VLM's eye (frozen). mode "features": the encoder's pre-quantisation
    latents (embed_dim channels); mode "codes": the image's VQ codes looked up in the frozen codebook and
    mapped to `out_dim` by a learned Linear, as DeLVM embeds codes. Takes pixels in [0, 1]."""

    def __init__(self, config: dict, mode: str = "features", out_dim: int | None = None, path: str | None = None):
        super().__init__()
        from tokenizer import VQGAN
        from tokenizer.config import VQGANConfig

        if mode not in ("features", "codes"):
            raise ValueError(f"VQGAN encoder mode must be 'features' or 'codes', got {mode!r}")
        self.vqgan = VQGAN.from_pretrained(path) if path else VQGAN(VQGANConfig.from_dict(config))
        self.vqgan.requires_grad_(False)
        self.mode = mode
        embed_dim = self.vqgan.config.embed_dim
        self.project = nn.Linear(embed_dim, out_dim or embed_dim) if mode == "codes" else None
        self.out_dim = out_dim or embed_dim if mode == "codes" else embed_dim
        self.image_size, self.patch_size = self.vqgan.config.resolution, self.vqgan.config.downsample_factor
        self.pixel_mean, self.pixel_std = (0.0,) * 3, (1.0,) * 3  # the VQGAN takes pixels in [0, 1]

    def spec(self) -> dict:
        config = self.vqgan.config.to_dict()
        return {"kind": "vqgan", "config": config, "mode": self.mode, "out_dim": self.out_dim}

    def train(self, mode: bool = True):
        super().train(mode)
        self.vqgan.eval()  # frozen: keep its quantizer's bookkeeping off
        return self

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        with torch.no_grad():
            latents = self.vqgan.quant_conv(self.vqgan.encoder(self.vqgan.to_model_range(pixel_values)))
        batch, _, h, w = latents.shape  # [B, embed_dim, h, w]
        if self.mode == "features":
            return VisionFeatures(latents.flatten(2).transpose(1, 2), (h, w))
        quantize = self.vqgan.quantize
        with torch.no_grad():
            codes = quantize.codes(latents)  # [B, h*w]
            vectors = quantize.codebook()[codes]  # [B, h*w, embed_dim]
        return VisionFeatures(self.project(vectors), (h, w))


# -- POINTS' dual encoder ----------------------------------------------------------------------------
class DualEncoder(nn.Module):
    """A general tower and a document (OCR) tower on the same pixels, features averaged with `weights`;
    both must give the same grid and width (POINTS merges CLIP and its OCR-tuned copy this way)."""

    def __init__(self, encoders: list[dict], weights: tuple[float, float] = (0.5, 0.5)):
        super().__init__()
        if len(encoders) != 2 or len(weights) != 2:
            raise ValueError(f"a dual encoder takes two encoder specs and two weights, got {len(encoders)} and {len(weights)}")
        self.general, self.document = (build_encoder(spec) for spec in encoders)
        if self.general.out_dim != self.document.out_dim:
            raise ValueError(f"dual encoder widths differ: general {self.general.out_dim}, document {self.document.out_dim}")
        self.weights = tuple(weights)
        self.out_dim = self.general.out_dim
        g = self.general
        self.image_size, self.patch_size, self.pixel_mean, self.pixel_std = g.image_size, g.patch_size, g.pixel_mean, g.pixel_std

    def spec(self) -> dict:
        return {"kind": "dual", "encoders": [self.general.spec(), self.document.spec()], "weights": list(self.weights)}

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        general, document = self.general(pixel_values), self.document(pixel_values)
        if general.features.shape != document.features.shape:
            raise ValueError(
                f"dual encoder towers disagree: {tuple(general.features.shape)} vs {tuple(document.features.shape)}"
            )
        features = self.weights[0] * general.features + self.weights[1] * document.features
        return VisionFeatures(features, general.grid)


ENCODERS = {"hf": HFVisionEncoder, "timm": TimmEncoder, "open_clip": OpenClipEncoder, "vqgan": VQGANEncoder, "dual": DualEncoder}


def build_encoder(spec: dict) -> nn.Module:
    """An encoder from its spec: {"kind": one of ENCODERS, **that kind's options}."""
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in ENCODERS:
        raise ValueError(f"unknown vision encoder kind {kind!r}; valid kinds: {', '.join(ENCODERS)}")
    return ENCODERS[kind](**options)
