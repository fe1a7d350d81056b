"""Procedural demo data: coloured shapes on a plain background, with exact ground truth.

Everything is a pure function of a seed, so an analogy task carries its correct answer and the
demo can score what a model generates. Images come at any size (64 for the demo, 256 by default).

Tasks, each a pair (x, y) of RGB images:
    segmentation  shapes -> their class mask (circle / square / triangle) in a palette colour
    edges         shapes -> white shape outlines on black
    recolor       shapes -> the same shapes, colours mapped by the fixed rule RECOLOR
    flip          shapes -> horizontal mirror image
    colorize      grayscale -> colour
    inpaint       a gray square hides part of the image -> the original

Train and held-out sentences use disjoint seed ranges (`procedural_seeds`), so held-out prompts
never reach training shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.sentences import ANALOGY, SEQUENCE, Sentence, grayscale, mask_region

TASKS = ("segmentation", "edges", "recolor", "flip", "colorize", "inpaint")
SHAPES = ("circle", "square", "triangle")
COLORS = np.array(
    [[220, 40, 40], [40, 180, 60], [40, 80, 220], [240, 200, 30], [200, 50, 200], [30, 200, 210]], np.uint8
)  # red, green, blue, yellow, magenta, cyan
RECOLOR = (2, 0, 1, 5, 3, 4)  # colour i becomes colour RECOLOR[i]: red->blue, green->red, ...
BACKGROUNDS = np.array([[245, 245, 240], [30, 30, 35], [200, 200, 205]], np.uint8)
HELDOUT_SEED_START = 1_000_000_000  # train seeds lie below, held-out seeds at or above
SOURCE = "procedural"


@dataclass
class Shape:
    kind: int  # index into SHAPES
    color: int  # index into COLORS
    center: tuple[float, float]  # (x, y) as fractions of the image side
    radius: float  # fraction of the image side


@dataclass
class Scene:
    background: int  # index into BACKGROUNDS
    shapes: list[Shape]


def procedural_seeds(split: str, count: int, start: int = 0) -> range:
    """`count` seeds of `split` ("train" or "heldout"/"val"); the two ranges never overlap."""
    if split == "train":
        if start + count > HELDOUT_SEED_START:
            raise ValueError(f"train seeds must stay below {HELDOUT_SEED_START}; asked for {start}+{count}")
        return range(start, start + count)
    if split in ("heldout", "val"):
        return range(HELDOUT_SEED_START + start, HELDOUT_SEED_START + start + count)
    raise ValueError(f"unknown split {split!r}; valid: train, heldout (or val)")


def random_scene(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
    shapes = [
        Shape(
            kind=int(rng.integers(len(SHAPES))),
            color=int(rng.integers(len(COLORS))),
            center=(float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75))),
            radius=float(rng.uniform(0.12, 0.22)),
        )
        for _ in range(int(rng.integers(1, max_shapes + 1)))
    ]
    return Scene(background=int(rng.integers(len(BACKGROUNDS))), shapes=shapes)


def render_labels(scene: Scene, size: int) -> np.ndarray:
    """int [size, size]: 0 for background, i + 1 where shape i is visible (later shapes on top)."""
    coords = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    labels = np.zeros((size, size), np.int64)
    for index, shape in enumerate(scene.shapes):
        dx, dy, r = x - shape.center[0], y - shape.center[1], shape.radius
        if SHAPES[shape.kind] == "circle":
            inside = dx**2 + dy**2 <= r**2
        elif SHAPES[shape.kind] == "square":
            inside = np.maximum(np.abs(dx), np.abs(dy)) <= r * 0.85
        else:  # triangle, apex up: half-width grows linearly from the apex to the base
            inside = (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
        labels[inside] = index + 1
    return labels


def _paint(scene: Scene, labels: np.ndarray, colors: np.ndarray) -> Image.Image:
    """Colour each shape i with colors[i] and the background with its scene colour."""
    table = np.concatenate([BACKGROUNDS[scene.background][None], colors.reshape(-1, 3)]).astype(np.uint8)
    return Image.fromarray(table[labels])


def render(scene: Scene, size: int) -> Image.Image:
    return _paint(scene, render_labels(scene, size), COLORS[[s.color for s in scene.shapes]])


def task_pair(task: str, scene: Scene, size: int, rng: np.random.Generator, palette: np.ndarray) -> tuple:
    """(x, y) PIL images for `task`. `palette` [3, 3] uint8 colours the segmentation classes;
    `rng` places the inpainting hole."""
    labels = render_labels(scene, size)
    image = _paint(scene, labels, COLORS[[s.color for s in scene.shapes]])
    if task == "segmentation":
        classes = np.array([0] + [s.kind + 1 for s in scene.shapes])[labels]
        return image, Image.fromarray(np.concatenate([np.zeros((1, 3), np.uint8), palette])[classes])
    if task == "edges":
        edge = np.zeros_like(labels, bool)
        edge[:-1] |= labels[:-1] != labels[1:]
        edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        return image, Image.fromarray(np.where(edge[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2))
    if task == "recolor":
        return image, _paint(scene, labels, COLORS[[RECOLOR[s.color] for s in scene.shapes]])
    if task == "flip":
        return image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if task == "colorize":
        return grayscale(image), image
    if task == "inpaint":
        return mask_region(image, int(rng.integers(2**31))), image
    raise ValueError(f"unknown procedural task {task!r}; valid: {', '.join(TASKS)}")


def procedural_analogy(task: str, seed: int, n_shots: int = 8, size: int = 256) -> Sentence:
    """An analogy sentence [x1, y1, ..., xn, yn] of `task`; the last pair is the query and its answer.

    The segmentation palette is drawn once per sentence (as UVD does), so the model must read the
    colour code from the examples. `sentence.meta` holds the seed and split for scoring.
    """
    if task not in TASKS:
        raise ValueError(f"unknown procedural task {task!r}; valid: {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, TASKS.index(task)])
    palette = rng.integers(40, 256, size=(len(SHAPES), 3)).astype(np.uint8)
    images = []
    for _ in range(n_shots):
        images.extend(task_pair(task, random_scene(rng), size, rng, palette))
    split = "heldout" if seed >= HELDOUT_SEED_START else "train"
    return Sentence(ANALOGY, images, SOURCE, task, {"seed": seed, "split": split, "n_shots": n_shots})


@dataclass
class Motion:
    """Constant velocity of one shape, in pixels per frame."""

    shape: int
    dx: float
    dy: float


def moving_shapes(seed: int, n_frames: int = 16, size: int = 256) -> tuple[Sentence, list[Motion]]:
    """A video sentence of shapes moving at constant velocity, and their (known) motions.

    Start and end points are drawn inside the frame, so nothing leaves the picture or bounces.
    """
    rng = np.random.default_rng([seed, len(TASKS)])
    scene = random_scene(rng)
    ends = [(float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75))) for _ in scene.shapes]
    steps = max(n_frames - 1, 1)
    velocities = [((ex - s.center[0]) / steps, (ey - s.center[1]) / steps) for s, (ex, ey) in zip(scene.shapes, ends, strict=True)]
    frames = []
    for t in range(n_frames):
        moved = Scene(
            scene.background,
            [
                Shape(s.kind, s.color, (s.center[0] + vx * t, s.center[1] + vy * t), s.radius)
                for s, (vx, vy) in zip(scene.shapes, velocities, strict=True)
            ],
        )
        frames.append(render(moved, size))
    motions = [Motion(i, vx * size, vy * size) for i, (vx, vy) in enumerate(velocities)]
    meta = {"seed": seed, "motions": [[m.dx, m.dy] for m in motions]}
    return Sentence(SEQUENCE, frames, SOURCE, "moving_shapes", meta), motions
