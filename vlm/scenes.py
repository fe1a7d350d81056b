"""Embedded VLM demo data: procedural scenes with captions and short-answer questions, and captioned photos.

    image, caption, qa = scene_sample(seed, size=64)
    # caption: "a small red circle left of a large blue square on a plain white background"
    # qa: [("count", "How many shapes are there?", "2"), ("color", "What colour is the circle?", "red"), ...]

A scene holds 1-3 shapes of distinct colours, each in its own slot (left, right, top, bottom, center), small
or large, on a plain or textured background. Everything is a pure function of the seed; train and held-out
scenes use disjoint seed ranges (`scene_seeds`, as data.procedural's tasks do). Answers are single words or
numbers so they can be scored by exact match; each QA pair records its type for per-type evaluation.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data import procedural
from data.photos import embedded_photo, embedded_photo_names

SHAPES = procedural.SHAPES  # circle, square, triangle
COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")  # data.procedural.COLORS, in order
BACKGROUND_NAMES = ("white", "black", "gray")  # data.procedural.BACKGROUNDS, in order
SLOTS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
SIZES = {"small": 0.085, "large": 0.145}  # radius as a fraction of the side; slots are 0.3 apart
QA_TYPES = ("count", "color", "shape", "where", "left_of", "right_of", "largest")
SOURCE = "scenes"


def scene_seeds(split: str, count: int, start: int = 0) -> range:
    """`count` seeds of "train" or "heldout"; the ranges never overlap (data.procedural.procedural_seeds)."""
    return procedural.procedural_seeds(split, count, start)


@dataclass(frozen=True)
class SceneShape:
    kind: str  # one of SHAPES
    color: str  # one of COLOR_NAMES
    size: str  # "small" | "large"
    slot: str  # a key of SLOTS

    @property
    def x(self) -> float:
        return SLOTS[self.slot][0]

    def describe(self, with_size: bool = True) -> str:
        return f"{self.size} {self.color} {self.kind}" if with_size else f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[SceneShape, ...]
    background: str  # one of BACKGROUND_NAMES
    textured: bool
    seed: int

    @classmethod
    def random(cls, seed: int) -> Scene:
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 4))
        colors = rng.choice(len(COLOR_NAMES), n, replace=False)
        slots = rng.choice(len(SLOTS), n, replace=False)
        shapes = tuple(
            SceneShape(SHAPES[int(rng.integers(len(SHAPES)))], COLOR_NAMES[c], ("small", "large")[int(rng.integers(2))], list(SLOTS)[s])
            for c, s in zip(colors, slots, strict=True)
        )
        return cls(shapes, BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))], bool(rng.integers(2)), seed)

    def render(self, size: int = 64) -> Image.Image:
        """RGB [size, size]: the background (with a seeded low-contrast texture if textured), shapes on top."""
        shapes = [
            procedural.Shape(SHAPES.index(s.kind), COLOR_NAMES.index(s.color), SLOTS[s.slot], SIZES[s.size]) for s in self.shapes
        ]
        labels = procedural.render_labels(procedural.Scene(BACKGROUND_NAMES.index(self.background), shapes), size)
        pixels = np.broadcast_to(procedural.BACKGROUNDS[BACKGROUND_NAMES.index(self.background)], (size, size, 3)).astype(np.int16)
        if self.textured:  # checks or stripes of +-18, a pattern no shape has
            rng = np.random.default_rng([self.seed, 7])
            period = int(rng.integers(2, 5)) * max(size // 32, 1)
            y, x = np.indices((size, size)) // period
            pattern = (x + y) % 2 if rng.integers(2) else x % 2
            pixels = pixels + np.where(pattern, 18, -18)[..., None]
        colors = procedural.COLORS[[COLOR_NAMES.index(s.color) for s in self.shapes]]
        for index, color in enumerate(colors):
            pixels[labels == index + 1] = color
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))

    def caption(self) -> str:
        """"a small red circle left of a large blue square, and ... on a plain white background"."""
        ordered = sorted(self.shapes, key=lambda s: SLOTS[s.slot])
        if len(ordered) == 1:
            text = f"a {ordered[0].describe()} {_where_phrase(ordered[0].slot)}"
        else:
            a, b = ordered[:2]
            relation = "left of" if a.x < b.x else "above"  # sorted by (x, y)
            text = f"a {a.describe()} {relation} a {b.describe()}"
            if len(ordered) == 3:
                text += f", and a {ordered[2].describe()} {_where_phrase(ordered[2].slot)}"
        return f"{text} on a {'textured' if self.textured else 'plain'} {self.background} background"

    def qa_pairs(self) -> list[tuple[str, str, str]]:
        """(qa_type, question, answer) for every type that has a unique answer in this scene, in QA_TYPES order."""
        rng = np.random.default_rng([self.seed, 1])

        def pick(candidates):
            return candidates[int(rng.integers(len(candidates)))] if candidates else None

        pairs = [("count", "How many shapes are there?", str(len(self.shapes)))]
        kinds = [s.kind for s in self.shapes]
        if shape := pick([s for s in self.shapes if kinds.count(s.kind) == 1]):
            pairs.append(("color", f"What colour is the {shape.kind}?", shape.color))
        shape = pick(list(self.shapes))
        pairs.append(("shape", f"What shape is the {shape.color} one?", shape.kind))
        shape = pick(list(self.shapes))
        pairs.append(("where", f"Where is the {shape.describe(False)}?", shape.slot))
        for qa_type, side in (("left_of", -1), ("right_of", 1)):
            # anchors with exactly one shape on that side, so the answer is unique
            unique = [(b, o[0]) for b in self.shapes if len(o := [a for a in self.shapes if (a.x - b.x) * side > 0.1]) == 1]
            if choice := pick(unique):
                anchor, other = choice
                pairs.append((qa_type, f"What shape is {qa_type.replace('_', ' ')} the {anchor.describe(False)}?", other.kind))
        large = [s for s in self.shapes if s.size == "large"]
        if len(self.shapes) > 1 and len(large) == 1:
            pairs.append(("largest", "What colour is the largest shape?", large[0].color))
        return pairs


def _where_phrase(slot: str) -> str:
    return {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}.get(slot, "in the center")


def scene_sample(seed: int, size: int = 64) -> tuple[Image.Image, str, list[tuple[str, str, str]]]:
    """(image, caption, [(qa_type, question, answer), ...]) of the scene of `seed`."""
    scene = Scene.random(seed)
    return scene.render(size), scene.caption(), scene.qa_pairs()


def majority_answers(count: int = 2000) -> dict[str, str]:
    """The most common answer per QA type over `count` training scenes: the best a model blind to the image
    can answer (the demo's text-only baseline)."""
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for seed in scene_seeds("train", count):
        for qa_type, _, answer in Scene.random(seed).qa_pairs():
            answers[qa_type][answer] += 1
    return {qa_type: counts.most_common(1)[0][0] for qa_type, counts in answers.items()}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene_samples(count: int, split: str = "train", size: int = 64, start: int = 0, qa: str = "single",
                  wrong_captions: float = 0.0) -> Iterator[dict]:
    """Normalised samples (vlm.formats) of `count` scenes: per scene one caption sample, then its questions.

    qa="single": one single-turn conversation per QA pair, with `qa_type` and `answer` (per-type scoring);
    qa="multi": one multi-turn conversation per scene asking them all (the image read once), with
    `qa_types` and `answers`; qa="none": the captions only. Every sample records its `scene_seed`.
    wrong_captions: that fraction of the scenes (chosen by a seeded draw) get another chosen scene's caption
    instead of their own, and every caption sample records `caption_true` -- known-noisy data for checking
    a data filter (vlm.filter)."""
    if qa not in ("single", "multi", "none"):
        raise ValueError(f"qa must be 'single', 'multi' or 'none', not {qa!r}")
    if not 0.0 <= wrong_captions <= 1.0:
        raise ValueError(f"wrong_captions is a fraction of the scenes, in [0, 1], not {wrong_captions}")
    seeds = scene_seeds(split, count, start)
    caption_of = _wrong_captions(seeds, wrong_captions) if wrong_captions else {}
    for seed in seeds:
        image, caption, pairs = scene_sample(seed, size)
        common = {"source": f"{SOURCE}-{split}", "images": [png_bytes(image)], "scene_seed": seed}
        shown = Scene.random(caption_of[seed]).caption() if seed in caption_of else caption
        truth = {"caption_true": shown == caption} if wrong_captions else {}
        yield {**common, "id": f"scene{seed}-caption", "kind": "caption", "turns": [{"role": "text", "content": f"<image>\n{shown}"}], **truth}
        # Multi-turn: the questions in a per-scene random order, so that no question type is always the first
        # (the one asked beside the image) and a model cannot answer by turn position.
        shuffled = [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))]
        groups = {"single": [[pair] for pair in pairs], "multi": [shuffled], "none": []}[qa]
        for group in groups:
            turns = []
            for _, question, answer in group:
                prefix = "" if turns else "<image>\n"
                turns += [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
            types, answers = [p[0] for p in group], [p[2] for p in group]
            extra = {"qa_type": types[0], "answer": answers[0]} if qa == "single" else {"qa_types": types, "answers": answers}
            name = types[0] if qa == "single" else "qa"
            yield {**common, "id": f"scene{seed}-{name}", "kind": "conversation", "turns": turns, **extra}


def _wrong_captions(seeds: range, fraction: float) -> dict[int, int]:
    """{scene seed: the seed whose caption it gets}: a seeded `fraction` of the scenes, each taking the next
    chosen scene's caption (a rotation, so no chosen scene keeps its own)."""
    rng = np.random.default_rng([seeds.start, len(seeds), 11])
    chosen = sorted(rng.choice(len(seeds), round(fraction * len(seeds)), replace=False).tolist())
    return {seeds[i]: seeds[chosen[(k + 1) % len(chosen)]] for k, i in enumerate(chosen)}


# Short captions written by hand for the embedded photos (data/photos.py), looking at each one.
PHOTO_CAPTIONS = {
    "astronaut": "an astronaut in an orange suit smiling in front of a flag and a space shuttle",
    "brick": "a gray brick wall",
    "camera": "a man looking through a camera on a tripod, in black and white",
    "chelsea": "a close-up of a tabby cat's face",
    "clock": "a blurry round clock on a gray background",
    "coffee": "a cup of coffee on a red saucer with a spoon",
    "coins": "rows of old coins, in black and white",
    "colorwheel": "a colour wheel with a rainbow of hues",
    "grass": "a close-up of grass, in black and white",
    "gravel": "a close-up of gravel, in black and white",
    "hubble_deep_field": "many small galaxies in dark space",
    "immunohistochemistry": "stained tissue cells under a microscope",
    "logo": "a round green and orange logo with a snake",
    "moon": "the surface of the moon with craters, in black and white",
    "page": "a scanned page of printed text",
    "retina": "a photo of the retina of an eye, orange with red blood vessels",
    "rocket": "a rocket on its launch pad at night",
    "text": "handwritten letters and numbers on gray paper",
    "stereo_motorcycle": "a red motorcycle parked in a garage",
    "cell": "a bright round cell under a microscope, in black and white",
    "microaneurysms": "a gray close-up of blood vessels in an eye",
    "china": "a chinese pagoda among green trees by a lake",
    "flower": "an orange dahlia flower on a dark green background",
    "grace_hopper": "a portrait of a woman in a navy uniform in front of a flag",
}


def photo_samples(split: str = "all") -> Iterator[dict]:
    """Caption samples of the embedded photos of `split` ("all", "train", "val"), images as PNG bytes."""
    for name in embedded_photo_names(split):
        yield {
            "id": f"photo-{name}",
            "source": f"photos-{split}",
            "kind": "caption",
            "turns": [{"role": "text", "content": f"<image>\n{PHOTO_CAPTIONS[name]}"}],
            "images": [_photo_png(name)],
        }


@functools.cache
def _photo_png(name: str) -> bytes:
    return png_bytes(embedded_photo(name))


def write_eval_folder(out: str | os.PathLike, count: int, split: str = "heldout", size: int = 64) -> Path:
    """An evaluation folder of `count` scenes in scripts/vlm_eval.py's layout (vlm.benchmark): images/, and
    questions.jsonl with every QA pair (type = its QA type), a caption per scene, and the shape question again
    as multiple choice over the three shapes (type "shape_choice"). Returns the questions file."""
    from lvm.checkpoints import atomic_path

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for seed in scene_seeds(split, count):
        image, caption, pairs = scene_sample(seed, size)
        name = f"images/scene{seed}.png"
        image.save(out / name)
        records.append({"id": f"scene{seed}-caption", "image": name, "captions": [caption]})
        for qa_type, question, answer in pairs:
            records.append({"id": f"scene{seed}-{qa_type}", "image": name, "question": question, "answer": answer, "type": qa_type})
            if qa_type == "shape":
                records.append({"id": f"scene{seed}-shape-choice", "image": name, "question": question, "options": list(SHAPES),
                                "answer": SHAPES.index(answer), "type": "shape_choice"})  # fmt: skip
    with atomic_path(out / "questions.jsonl") as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records))
    return out / "questions.jsonl"
