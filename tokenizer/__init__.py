"""VQGAN tokenizer: images <-> visual-sentence tokens."""

from tokenizer.config import PRESETS, VQGANConfig
from tokenizer.images import fit_to_resolution, load_image, to_pil, to_rgb, to_tensor
from tokenizer.model import VQGAN

__all__ = ["PRESETS", "VQGAN", "VQGANConfig", "fit_to_resolution", "load_image", "to_pil", "to_rgb", "to_tensor"]
