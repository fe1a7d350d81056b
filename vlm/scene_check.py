"""Scoring a generated image against the scene caption it was drawn from, with the scene generator's own renderer.

    scores = check_image(image, scene)          # {"color": [bool per described shape], "shape": [...], "position": [...]}
    attribute_accuracy(images, scenes)          # {"accuracy": mean over every judgement, "color": .., "shape": .., "position": ..}

A caption (vlm.scenes.Scene.caption) names each shape's colour and kind, and places it either absolutely
("on the left") or relative to another shape ("left of", "above"); two shapes never share a colour. So the
image is read per colour, GenEval-style:
  1. every pixel gets the shape colour it leans to and how much of it it holds (`colour_coverage`: the
     backgrounds are grey, so a blurred edge is a share of the shape colour and a share of grey);
  2. a colour's object is its largest 4-connected blob of pixels at least half covered, kept when it covers
     at least a third of the smallest shape's area (stray pixels of a noisy decode are not objects);
  3. its slot is the slot (vlm.scenes.SLOTS) whose window (half the slot spacing around it) holds most of it;
  4. its kind is the template, rendered by data.procedural.render_labels (3 kinds x 2 sizes, antialiased,
     centred on the blob), that best matches the blob's coverage.
Each described shape is then judged three times: colour (an object of its colour exists), shape (that object
is of its kind) and position (that object is where the caption says: in the named slot, or left of / above
the other shape of the relation). A true render scores 1; a render of another scene scores near chance.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from data import procedural
from vlm.scenes import COLOR_NAMES, SHAPES, SIZES, SLOTS, Scene, SceneShape

ATTRIBUTES = ("color", "shape", "position")
COLOURS = procedural.COLORS.astype(np.float32)  # [6, 3], in COLOR_NAMES order
WINDOW = 0.15  # half the 0.3 spacing of the slots: the windows of two slots never overlap
MIN_AREA = 1 / 3  # of the smallest shape's area (a small triangle: 2 r^2)


def as_array(image) -> np.ndarray:
    """A PIL image, uint8 array [H, W, 3] or float tensor [3, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        return image.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"an image array must be [H, W, 3], got shape {array.shape}")
    return array.astype(np.uint8)


def colour_coverage(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] -> (colour index int [H, W], coverage float [H, W] in [0, 1]).

    Every background is grey (data.procedural.BACKGROUNDS, textures add grey), so a pixel that blends a shape
    colour with the background keeps that colour's direction off the grey axis, shortened by the share the
    shape covers: the colour is the nearest direction, the coverage the length along it."""
    offsets = pixels.astype(np.float32) - pixels.mean(-1, keepdims=True)  # [H, W, 3], 0 for any grey
    directions = COLOURS - COLOURS.mean(-1, keepdims=True)  # [6, 3]
    along = offsets @ directions.T / (directions**2).sum(-1)  # [H, W, 6]: coverage if it were colour i
    cosine = along * np.linalg.norm(directions, axis=-1) / np.linalg.norm(offsets, axis=-1, keepdims=True).clip(1e-6)
    index = cosine.argmax(-1)
    return index, np.take_along_axis(along, index[..., None], -1)[..., 0].clip(0, 1)


@functools.cache
def _centred(kind: str, radius: float, fine: int) -> np.ndarray:
    """bool [fine, fine]: the shape rendered by data.procedural.render_labels at the centre of the canvas."""
    scene = procedural.Scene(0, [procedural.Shape(SHAPES.index(kind), 0, (0.5, 0.5), radius)])
    return procedural.render_labels(scene, fine) > 0


def _template(kind: str, radius: float, cx: float, cy: float, size: int) -> np.ndarray:
    """float [size, size]: the share of each pixel the shape centred at (cx, cy) covers (rendered at 4x and
    averaged; placed to a quarter pixel)."""
    return _placed(kind, radius, round((cx - 0.5) * 4 * size), round((cy - 0.5) * 4 * size), size)


@functools.lru_cache(maxsize=8192)
def _placed(kind: str, radius: float, dx: int, dy: int, size: int) -> np.ndarray:
    moved = np.roll(_centred(kind, radius, 4 * size), (dy, dx), axis=(0, 1))
    return moved.reshape(size, 4, size, 4).mean((1, 3), dtype=np.float32)


def _slot_of(mask: np.ndarray) -> str | None:
    """The slot whose window holds most of `mask` (None when no window holds any of it)."""
    size = mask.shape[0]
    y, x = np.nonzero(mask)
    x, y = (x + 0.5) / size, (y + 0.5) / size
    counts = {slot: int(((abs(x - cx) <= WINDOW) & (abs(y - cy) <= WINDOW)).sum()) for slot, (cx, cy) in SLOTS.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def _kind_of(coverage: np.ndarray) -> str:
    """The kind whose antialiased template (either size +-10%: pixel-centre sampling grows or shrinks a shape;
    centred on the blob's centroid +-1/2 px) best matches the blob's coverage (soft IoU:
    sum of minima over sum of maxima)."""
    size = coverage.shape[0]
    y, x = np.indices(coverage.shape)
    cx, cy = ((x + 0.5) * coverage).sum() / coverage.sum() / size, ((y + 0.5) * coverage).sum() / coverage.sum() / size
    steps = [d / size for d in (-0.5, 0.0, 0.5)]
    best, best_score = SHAPES[0], -1.0
    for kind in SHAPES:
        for radius in (r * scale for r in SIZES.values() for scale in (0.9, 1.0, 1.1)):
            shift = radius / 3 if kind == "triangle" else 0.0  # a triangle's centroid lies r/3 below its centre
            for dx in steps:
                for dy in steps:
                    template = _template(kind, radius, cx + dx, cy - shift + dy, size)
                    score = np.minimum(template, coverage).sum() / np.maximum(template, coverage).sum()
                    if score > best_score:
                        best, best_score = kind, score
    return best


def find_objects(image) -> dict[str, tuple[str, str | None]]:
    """colour name -> (kind, slot) of each colour's object in the image (see the module docstring)."""
    pixels = as_array(image)
    if pixels.shape[0] != pixels.shape[1]:
        raise ValueError(f"scene images are square, got {pixels.shape[1]}x{pixels.shape[0]}")
    size = pixels.shape[0]
    index, coverage = colour_coverage(pixels)
    min_pixels = MIN_AREA * 2 * (min(SIZES.values()) * size) ** 2
    objects = {}
    for colour, name in enumerate(COLOR_NAMES):
        blobs, count = ndimage.label((index == colour) & (coverage >= 0.5))
        if not count:
            continue
        areas = np.bincount(blobs.ravel())[1:]
        if areas.max() < min_pixels:
            continue
        mask = blobs == 1 + int(areas.argmax())
        near = ndimage.binary_dilation(mask, iterations=2) & (index == colour)  # the blob and its blurred rim
        objects[name] = (_kind_of(np.where(near, coverage, 0.0)), _slot_of(mask))
    return objects


def _relations(scene: Scene) -> dict[SceneShape, tuple]:
    """Where the caption places each shape: ("slot", slot), or ("left of" | "above", other shape) for the
    first of a related pair and ("right of" | "below", other shape) for the second (vlm.scenes.Scene.caption)."""
    ordered = sorted(scene.shapes, key=lambda s: SLOTS[s.slot])
    if len(ordered) == 1:
        return {ordered[0]: ("slot", ordered[0].slot)}
    a, b = ordered[:2]
    relation = "left of" if a.x < b.x else "above"
    places = {a: (relation, b), b: ({"left of": "right of", "above": "below"}[relation], a)}
    if len(ordered) == 3:
        places[ordered[2]] = ("slot", ordered[2].slot)
    return places


def _holds(relation: str, mine: str, other: str) -> bool:
    (x, y), (ox, oy) = SLOTS[mine], SLOTS[other]
    if relation in ("left of", "right of"):
        return (ox - x if relation == "left of" else x - ox) > 0.1
    return abs(x - ox) < 0.1 and (oy - y if relation == "above" else y - oy) > 0.1


def check_image(image, scene: Scene) -> dict[str, list[bool]]:
    """Per attribute (ATTRIBUTES), one judgement per shape of `scene`, in scene order."""
    objects, places = find_objects(image), _relations(scene)
    scores = {attribute: [] for attribute in ATTRIBUTES}
    for shape in scene.shapes:
        found = objects.get(shape.color)
        scores["color"].append(found is not None)
        scores["shape"].append(found is not None and found[0] == shape.kind)
        relation, target = places[shape]
        if found is None or found[1] is None:
            placed = False
        elif relation == "slot":
            placed = found[1] == target
        else:
            other = objects.get(target.color)
            placed = other is not None and other[1] is not None and _holds(relation, found[1], other[1])
        scores["position"].append(placed)
    return scores


def attribute_accuracy(images: Sequence, scenes: Sequence[Scene]) -> dict[str, float]:
    """Mean accuracy per attribute and over every judgement ("accuracy") of images drawn from `scenes`' captions,
    and the number of judgements ("judgements": the standard error of "accuracy" is at most 0.5 / sqrt of it)."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes: give one image per scene")
    totals = {attribute: [] for attribute in ATTRIBUTES}
    for image, scene in zip(images, scenes, strict=True):
        for attribute, judged in check_image(image, scene).items():
            totals[attribute].extend(judged)
    result = {attribute: float(np.mean(judged)) if judged else 0.0 for attribute, judged in totals.items()}
    every = [j for judged in totals.values() for j in judged]
    result["accuracy"] = float(np.mean(every)) if every else 0.0
    result["judgements"] = len(every)
    return result
