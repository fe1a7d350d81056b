"""PIL images -> the encoder's pixel tiles and the image-token count each image needs.

    processor = ImageProcessor.for_model(vlm, tiling="internvl", max_tiles=6)
    out = processor([image_a, image_b])
    out.pixel_values       # float [n_tiles_total, 3, S, S], normalised as the encoder was trained
    out.tiles_per_image    # [n_a, n_b]
    out.tokens_per_image   # [n_a * t, n_b * t], t = connector.num_tokens(encoder grid): what each
                           # <image> placeholder expands to (vlm.splice.expand_placeholders)

Tiling: "none" (the whole image stretched to S x S), "internvl", "anyres" (LLaVA-NeXT), "catty" (POINTS);
see vlm/tiling.py. Any PIL mode becomes RGB first (vlm.tiling.to_rgb), or raises saying what it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from vlm import tiling

TILINGS = ("none", "internvl", "anyres", "catty")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class ProcessedImages(NamedTuple):
    pixel_values: torch.Tensor  # [n_tiles_total, 3, S, S]
    tiles_per_image: list[int]
    tokens_per_image: list[int]


@dataclass
class ImageProcessor:
    tile_size: int
    tokens_per_tile: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    tiling: str = "none"
    min_tiles: int = 1
    max_tiles: int = 6

    def __post_init__(self):
        if self.tiling not in TILINGS:
            raise ValueError(f"unknown tiling {self.tiling!r}; valid: {', '.join(TILINGS)}")

    @classmethod
    def for_model(cls, model, **options) -> ImageProcessor:
        """The processor a VLM's encoder and connector imply: tile size and normalisation from the encoder,
        tokens per tile from the connector on the encoder's grid."""
        encoder = model.encoder
        grid = (encoder.image_size // encoder.patch_size,) * 2
        return cls(encoder.image_size, model.num_image_tokens(grid), tuple(encoder.pixel_mean), tuple(encoder.pixel_std), **options)

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        image, size = tiling.to_rgb(image), self.tile_size
        if self.tiling == "internvl":
            return tiling.internvl_tiles(image, size, self.min_tiles, self.max_tiles)
        if self.tiling == "anyres":
            grid = [(c * size, r * size) for c in range(1, 4) for r in range(1, 4) if 1 < c * r <= self.max_tiles]
            return tiling.anyres_tiles(image, grid, size)
        if self.tiling == "catty":
            return tiling.catty_tiles(image, size, self.max_tiles)
        return [image.resize((size, size), Image.BICUBIC)]

    def __call__(self, images: list[Image.Image] | Image.Image) -> ProcessedImages:
        images = [images] if isinstance(images, Image.Image) else list(images)
        per_image = [self.tiles(image) for image in images]
        tensors = [self._to_tensor(tile) for tiles in per_image for tile in tiles]
        pixel_values = torch.stack(tensors) if tensors else torch.zeros(0, 3, self.tile_size, self.tile_size)
        counts = [len(tiles) for tiles in per_image]
        return ProcessedImages(pixel_values, counts, [n * self.tokens_per_tile for n in counts])

    def _to_tensor(self, tile: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, S, S]
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return (pixels - mean) / std
