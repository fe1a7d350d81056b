"""Labelled images for probing frozen features, generated or shipped with installed packages.

    shapes   3 classes: circle / square / triangle, one shape of any colour on any background
    colors   6 classes: the shape's colour (whatever its kind)
    digits   10 classes: scikit-learn's 8x8 handwritten digits (1797 images), upscaled, white on black

`labelled(name, split, size)` -> (images float [n, 3, size, size] in [0, 1], labels long [n], classes).
Train and test never share an image: procedural ones take disjoint seed ranges, digits every 5th image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from data.procedural import COLORS, SHAPES, procedural_seeds, random_scene, render

DATASETS = ("shapes", "colors", "digits")


def procedural_classes(label: str, split: str, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` one-shape scenes labelled by the shape's kind ("shapes") or colour ("colors")."""
    images, labels = [], []
    for seed in procedural_seeds(split, count):
        scene = random_scene(np.random.default_rng(seed), max_shapes=1)
        images.append(torch.from_numpy(np.asarray(render(scene, size))).permute(2, 0, 1))
        labels.append(scene.shapes[0].kind if label == "shapes" else scene.shapes[0].color)
    return torch.stack(images).float() / 255, torch.tensor(labels)


def digits(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (values 0..16 on an 8x8 grid) bilinearly upscaled to size x size, as RGB."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.arange(len(data.target)) % 5 == 0
    keep = keep if split in ("test", "heldout", "val") else ~keep
    pixels = torch.from_numpy(data.images[keep]).float()[:, None] / 16  # [n, 1, 8, 8]
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return pixels.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(data.target[keep]).long()


def labelled(name: str, split: str, size: int, count: int = 600) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, labels, number of classes) of dataset `name` ("train" or "test" split); `count` images
    for the procedural sets (digits has its fixed 1437 train / 360 test)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid: train, test")
    if name == "digits":
        return (*digits(split, size), 10)
    if name in ("shapes", "colors"):
        images, labels = procedural_classes(name, "train" if split == "train" else "heldout", count, size)
        return images, labels, len(SHAPES) if name == "shapes" else len(COLORS)
    raise ValueError(f"unknown labelled dataset {name!r}; valid: {', '.join(DATASETS)}")
