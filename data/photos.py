"""Real photos that ship inside installed packages: the default image source, nothing to download.

scikit-image's `skimage.data` (the ones bundled in its wheel), scikit-learn's sample images and
matplotlib's `grace_hopper.jpg`. A fixed few are held out for validation so that the tokenizer's
validation images are never trained on.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket",
    "text", "stereo_motorcycle", "cell", "microaneurysms",
)  # fmt: skip
SKLEARN_PHOTOS = ("china", "flower")
MATPLOTLIB_PHOTOS = ("grace_hopper",)
VALIDATION_PHOTOS = ("coffee", "chelsea", "flower")


def embedded_photo_names(split: str = "all") -> list[str]:
    """Names of the embedded photos in `split`: "all", "train" or "val"."""
    names = [*SKIMAGE_PHOTOS, *SKLEARN_PHOTOS, *MATPLOTLIB_PHOTOS]
    if split == "all":
        return names
    if split == "train":
        return [n for n in names if n not in VALIDATION_PHOTOS]
    if split == "val":
        return list(VALIDATION_PHOTOS)
    raise ValueError(f"unknown split {split!r}; valid: all, train, val")


@functools.cache
def embedded_photo(name: str) -> Image.Image:
    """One embedded photo as a PIL image in its own mode (grayscale and RGBA ones included)."""
    if name in SKIMAGE_PHOTOS:
        import skimage.data

        array = getattr(skimage.data, name)()
        array = array[0] if isinstance(array, tuple) else array  # stereo_motorcycle: (left, right, disparity)
        return Image.fromarray(array)
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        return Image.fromarray(np.asarray(load_sample_image(f"{name}.jpg")))
    if name in MATPLOTLIB_PHOTOS:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(f"{name}.jpg") as file:
            image = Image.open(file)
            image.load()
            return image
    raise ValueError(f"unknown embedded photo {name!r}; valid: {', '.join(embedded_photo_names())}")


def embedded_photos(split: str = "all") -> list[Image.Image]:
    return [embedded_photo(name) for name in embedded_photo_names(split)]
