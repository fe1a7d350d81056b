"""Visual sentences: ordered lists of images with a kind, built lazily from any image source.

A sentence's images may be PIL images, file paths, or zero-argument callables (`derived`): paths
and callables are only resolved when the sentence is encoded, so building (and skipping, on
resume) a large stream of sentences is cheap.

Layouts (x = input image, y = its annotation; defaults as in the LVM paper, 16 images per
sentence = 4096 tokens at 256 tokens per image):
    single              [img]
    sequence            [f0, f_s, f_2s, ...]                    n frames, stride s
    analogy             [x1, y1, x2, y2, ...]                    n_shots pairs
    multitask           [m_a, m_b, m_c, m_a, m_b, m_c, ...]      modality order shuffled per sentence
    annotated_sequence  [f1, a1, f2, a2, ...] (interleaved) or [f1, f2, ..., a1, a2, ...] (separated)
    category            [img, img, ...]                          images of one category
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tokenizer.images import ImageLike, resolve_image

SINGLE, SEQUENCE, ANALOGY, MULTITASK, ANNOTATED_SEQUENCE, CATEGORY = (
    "single", "sequence", "analogy", "multitask", "annotated_sequence", "category",
)  # fmt: skip
KINDS = (SINGLE, SEQUENCE, ANALOGY, MULTITASK, ANNOTATED_SEQUENCE, CATEGORY)
IMAGES_PER_SENTENCE = 16

@dataclass
class Sentence:
    """One visual sentence. `meta` carries kind-specific facts (seed, stride, task order, ...)."""

    kind: str
    images: list[ImageLike]
    source: str
    task: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown sentence kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if not self.images:
            raise ValueError(f"a {self.kind} sentence from {self.source!r} has no images")

    @property
    def prompt(self) -> list[ImageLike]:
        """All images but the last: for an analogy, the examples and the query."""
        return self.images[:-1]

    @property
    def answer(self) -> ImageLike:
        """The last image: for an analogy, the correct answer to the query."""
        return self.images[-1]

    def resolved(self) -> list[Image.Image]:
        return [resolve_image(image) for image in self.images]


def _apply(transform: Callable, image: ImageLike, args: tuple) -> Image.Image:
    return transform(resolve_image(image), *args)


def derived(transform: Callable[..., Image.Image], image: ImageLike, *args) -> Callable[[], Image.Image]:
    """A lazy image `transform(resolve_image(image), *args)`, e.g. derived(grayscale, path)."""
    return functools.partial(_apply, transform, image, args)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def single_sentences(images: Sequence[ImageLike], source: str) -> Iterator[Sentence]:
    """One sentence per image; packing concatenates them into full rows."""
    for image in images:
        yield Sentence(SINGLE, [image], source)


def sequence_sentences(
    frames: Sequence[ImageLike],
    source: str,
    length: int = IMAGES_PER_SENTENCE,
    stride: int = 1,
    max_stride: int | None = None,
    seed: int = 0,
) -> Iterator[Sentence]:
    """Non-overlapping windows of `length` frames taken every `stride` frames.

    With `max_stride`, each window draws its stride uniformly from 1..max_stride (seeded), as UVD
    samples videos at varying speeds. Windows that would run past the last frame are dropped.
    """
    rng = np.random.default_rng(seed)
    start = 0
    while True:
        step = int(rng.integers(1, max_stride + 1)) if max_stride else stride
        span = (length - 1) * step + 1
        if start + span > len(frames):
            return
        yield Sentence(SEQUENCE, list(frames[start : start + span : step]), source, meta={"stride": step, "start": start})
        start += span


def analogy_sentences(
    pairs: Sequence[tuple[ImageLike, ImageLike]], task: str, source: str, n_shots: int = IMAGES_PER_SENTENCE // 2
) -> Iterator[Sentence]:
    """[x1, y1, ..., xn, yn] from consecutive groups of `n_shots` (input, annotation) pairs."""
    for group in _chunks(pairs, n_shots):
        yield Sentence(ANALOGY, [image for pair in group for image in pair], source, task, {"n_shots": len(group)})


def _colour_labels(labels: ImageLike, palette: np.ndarray) -> Image.Image:
    """A class-index image (mode L / P / I) -> RGB, class c painted palette[c]."""
    image = resolve_image(labels) if not isinstance(labels, (str, os.PathLike)) else Image.open(labels)
    indices = np.asarray(image).astype(np.int64)
    if indices.ndim != 2:
        raise ValueError(f"a segmentation label map must be single-channel class indices; got shape {indices.shape}")
    return Image.fromarray(palette[indices % len(palette)])


def segmentation_sentences(
    pairs: Sequence[tuple[ImageLike, ImageLike]], source: str, n_shots: int = IMAGES_PER_SENTENCE // 2, seed: int = 0
) -> Iterator[Sentence]:
    """Analogies [image, coloured mask] x n_shots from (image, class-index map) pairs.

    Each sentence draws its own random palette (256 colours, class 0 stays black), so a class has no
    fixed colour and the model has to read the code from the examples, as in UVD.
    """
    rng = np.random.default_rng(seed)
    for group in _chunks(pairs, n_shots):
        palette = rng.integers(0, 256, size=(256, 3)).astype(np.uint8)
        palette[0] = 0
        images = [im for image, labels in group for im in (image, functools.partial(_colour_labels, labels, palette))]
        yield Sentence(ANALOGY, images, source, "segmentation", {"n_shots": len(group)})


def grayscale(image: Image.Image) -> Image.Image:
    """Luminance replicated to three channels: the colourisation input."""
    return image.convert("L").convert("RGB")


def mask_region(image: Image.Image, seed: int) -> Image.Image:
    """Hide a random rectangle of 1/4 to 1/2 of each side under flat gray: the inpainting input."""
    array = np.array(image.convert("RGB"))
    rng = np.random.default_rng(seed)
    height, width = array.shape[:2]
    side_h, side_w = (int(rng.integers(n // 4, n // 2 + 1)) for n in (height, width))
    top, left = int(rng.integers(0, height - side_h + 1)), int(rng.integers(0, width - side_w + 1))
    array[top : top + side_h, left : left + side_w] = 128
    return Image.fromarray(array)


def colorization_pair(image: ImageLike) -> tuple[ImageLike, ImageLike]:
    """(gray, colour): the colourisation analogy pair."""
    return derived(grayscale, image), image


def inpainting_pair(image: ImageLike, seed: int) -> tuple[ImageLike, ImageLike]:
    """(masked, original): a random rectangle of 1/4 to 1/2 of each side hidden under gray."""
    return derived(mask_region, image, seed), image


def multitask_sentences(
    shots: Sequence[Mapping[str, ImageLike]],
    source: str,
    images_per_sentence: int = IMAGES_PER_SENTENCE,
    seed: int = 0,
) -> Iterator[Sentence]:
    """Aligned modalities x shots: [m_a, m_b, ..] per shot, the modality order shuffled per sentence.

    `shots` are dicts of aligned images keyed by modality (e.g. {"image", "depth", "normals"}), all
    with the same keys; a sentence takes as many shots as fit in `images_per_sentence`.
    """
    if not shots:
        return
    modalities = sorted(shots[0])
    per_sentence = max(1, images_per_sentence // len(modalities))
    rng = np.random.default_rng(seed)
    for group in _chunks(shots, per_sentence):
        order = [modalities[i] for i in rng.permutation(len(modalities))]
        images = [shot[m] for shot in group for m in order]
        yield Sentence(MULTITASK, images, source, "+".join(order), {"order": order, "n_shots": len(group)})


def annotated_sequence_sentences(
    frames: Sequence[ImageLike],
    annotations: Sequence[ImageLike],
    task: str,
    source: str,
    frames_per_sentence: int = IMAGES_PER_SENTENCE // 2,
    interleave: bool = True,
) -> Iterator[Sentence]:
    """Frames with their annotations: [f1, a1, f2, a2, ..] interleaved or [f1, f2, .., a1, a2, ..]."""
    if len(frames) != len(annotations):
        raise ValueError(f"{len(frames)} frames but {len(annotations)} annotations in {source!r}")
    for start in range(0, len(frames) - frames_per_sentence + 1, frames_per_sentence):
        f = list(frames[start : start + frames_per_sentence])
        a = list(annotations[start : start + frames_per_sentence])
        images = [im for pair in zip(f, a, strict=True) for im in pair] if interleave else f + a
        yield Sentence(ANNOTATED_SEQUENCE, images, source, task, {"interleave": interleave, "start": start})


def category_sentences(
    groups: Mapping[str, Sequence[ImageLike]], source: str, images_per_sentence: int = IMAGES_PER_SENTENCE, seed: int = 0
) -> Iterator[Sentence]:
    """Images of one category per sentence, shuffled within the category (seeded)."""
    rng = np.random.default_rng(seed)
    for category in sorted(groups):
        images = list(groups[category])
        images = [images[i] for i in rng.permutation(len(images))]
        for chunk in _chunks(images, images_per_sentence):
            yield Sentence(CATEGORY, list(chunk), source, category)
