"""Labelled images for probing frozen features, generated or shipped with installed packages.

    shapes   3 classes: circle / square / triangle, one shape of any colour on any background
    colors   6 classes: the shape's colour (whatever its kind)
    same_color  2 classes: two shapes (any kinds, one in each half) of different (0) or the same (1) colour:
                a relation across patches, which no single patch's pixels tell
    digits   10 classes: scikit-learn's 8x8 handwritten digits (1797 images), upscaled, white on black

`labelled(name, split, size)` -> (images float [n, 3, size, size] in [0, 1], labels long [n], classes).
Train and test never share an image: procedural ones take disjoint seed ranges, digits every 5th image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from data.procedural import BACKGROUNDS, COLORS, SHAPES, Scene, Shape, procedural_seeds, random_scene, render

SAME_COLOR_SEEDS = 5_000_000  # seeds of its own, so its scenes are not the one-shape sets' scenes
DATASETS = ("shapes", "colors", "same_color", "digits")


def procedural_classes(label: str, split: str, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` one-shape scenes labelled by the shape's kind ("shapes") or colour ("colors")."""
    images, labels = [], []
    for seed in procedural_seeds(split, count):
        scene = random_scene(np.random.default_rng(seed), max_shapes=1)
        images.append(torch.from_numpy(np.array(render(scene, size))).permute(2, 0, 1))
        labels.append(scene.shapes[0].kind if label == "shapes" else scene.shapes[0].color)
    return torch.stack(images).float() / 255, torch.tensor(labels)


def same_color(split: str, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` two-shape scenes, half of them (at random) with both shapes in one colour (label 1), the others
    in two different colours (label 0); kinds, sizes, vertical positions and background are drawn freely."""
    images, labels = [], []
    for seed in procedural_seeds(split, count, start=SAME_COLOR_SEEDS):
        rng = np.random.default_rng(seed)
        same = int(rng.integers(2))
        first = int(rng.integers(len(COLORS)))
        second = first if same else (first + int(rng.integers(1, len(COLORS)))) % len(COLORS)
        shapes = [
            Shape(kind=int(rng.integers(len(SHAPES))), color=int(color), radius=float(rng.uniform(0.12, 0.2)),
                  center=(float(rng.uniform(low, low + 0.08)), float(rng.uniform(0.25, 0.75))))
            for color, low in zip(rng.permutation([first, second]), (0.22, 0.7), strict=True)
        ]  # one shape in each half: they never overlap
        scene = Scene(background=int(rng.integers(len(BACKGROUNDS))), shapes=shapes)
        images.append(torch.from_numpy(np.array(render(scene, size))).permute(2, 0, 1))
        labels.append(same)
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
    seeds = "train" if split == "train" else "heldout"
    if name in ("shapes", "colors"):
        images, labels = procedural_classes(name, seeds, count, size)
        return images, labels, len(SHAPES) if name == "shapes" else len(COLORS)
    if name == "same_color":
        return (*same_color(seeds, count, size), 2)
    raise ValueError(f"unknown labelled dataset {name!r}; valid: {', '.join(DATASETS)}")
