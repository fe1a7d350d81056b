"""Embedded VLM demo data (vlm/scenes.py): answers checked against the pixels, splits, photo captions."""

import collections
import io

import numpy as np
from PIL import Image

from data.photos import embedded_photo_names
from data.procedural import COLORS
from vlm.scenes import (
    COLOR_NAMES,
    PHOTO_CAPTIONS,
    QA_TYPES,
    SLOTS,
    Scene,
    majority_answers,
    photo_samples,
    scene_sample,
    scene_samples,
    scene_seeds,
)

SIZE = 64


def color_masks(image):
    """colour name -> bool [H, W] of pixels painted exactly in that colour."""
    pixels = np.asarray(image)
    return {name: (pixels == COLORS[i]).all(-1) for i, name in enumerate(COLOR_NAMES) if (pixels == COLORS[i]).all(-1).any()}


def centroid(mask):
    y, x = np.nonzero(mask)
    return x.mean() / mask.shape[1], y.mean() / mask.shape[0]


def kind_of(mask):
    """circle / square / triangle from how much of its bounding box the shape fills (pi/4, 1, 1/2)."""
    y, x = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(x) + 1) * (np.ptp(y) + 1))
    return min({"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}.items(), key=lambda kv: abs(kv[1] - fill))[0]


def test_answers_match_the_pixels():
    seen = collections.Counter()
    for seed in scene_seeds("train", 120):
        image, caption, qa = scene_sample(seed, SIZE)
        masks = color_masks(image)
        where = {c: min(SLOTS, key=lambda s: np.hypot(*np.subtract(SLOTS[s], centroid(m)))) for c, m in masks.items()}
        kinds = {c: kind_of(m) for c, m in masks.items()}
        for qa_type, question, answer in qa:
            seen[qa_type] += 1
            assert answer and " " not in answer  # single words / numbers, for exact match
            if qa_type == "count":
                assert int(answer) == len(masks)
            elif qa_type == "color":
                assert [kinds[answer]] == [k for k in kinds.values() if k in question]
            elif qa_type == "shape":
                assert kinds[question.split()[-2]] == answer
            elif qa_type == "where":
                assert where[question.split()[-2]] == answer
            elif qa_type in ("left_of", "right_of"):
                anchor = question.split()[-2]
                side = -1 if qa_type == "left_of" else 1
                others = [c for c in masks if (centroid(masks[c])[0] - centroid(masks[anchor])[0]) * side > 0.1]
                assert [kinds[c] for c in others] == [answer]
            elif qa_type == "largest":
                assert max(masks, key=lambda c: masks[c].sum()) == answer
        for color in masks:  # the caption names every shape
            assert f"{color} {kinds[color]}" in caption
    assert set(seen) == set(QA_TYPES) and min(seen.values()) >= 10


def test_deterministic_and_split_by_seed():
    a, b = scene_sample(7, 32), scene_sample(7, 32)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1:] == b[1:] and a[0].size == (32, 32)
    assert set(scene_seeds("train", 500)).isdisjoint(scene_seeds("heldout", 500))
    # a textured background has no pixel of a shape colour, and held-out scenes vary too
    textured = next(Scene.random(s) for s in scene_seeds("heldout", 50) if Scene.random(s).textured)
    pixels = np.asarray(textured.render(SIZE))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > len(textured.shapes) + 1
    assert len({Scene.random(s).caption() for s in scene_seeds("heldout", 50)}) > 40


def test_text_only_baseline_is_weak():
    """The majority answer per question type (what a model blind to the image can do) stays well below 1."""
    majority = majority_answers(600)
    assert set(majority) == set(QA_TYPES)
    held_out = [qa for seed in scene_seeds("heldout", 300) for qa in Scene.random(seed).qa_pairs()]
    accuracy = np.mean([majority[qa_type] == answer for qa_type, _, answer in held_out])
    assert 0.2 < accuracy < 0.5, accuracy


def test_scene_and_photo_samples():
    samples = list(scene_samples(3, "heldout", size=32))
    kinds = collections.Counter(s["kind"] for s in samples)
    assert kinds["caption"] == 3 and kinds["conversation"] == len(samples) - 3
    for sample in samples:
        assert sum(t["content"].count("<image>") for t in sample["turns"]) == len(sample["images"]) == 1
        assert Image.open(io.BytesIO(sample["images"][0])).size == (32, 32)
        if sample["kind"] == "conversation":
            assert sample["qa_type"] in QA_TYPES and sample["turns"][-1] == {"role": "assistant", "content": sample["answer"]}
    multi = [s for s in scene_samples(3, "heldout", size=32, qa="multi") if s["kind"] == "conversation"]
    assert len(multi) == 3 and sum(len(s["answers"]) for s in multi) == kinds["conversation"]
    assert [t["content"] for t in multi[0]["turns"][1::2]] == multi[0]["answers"]
    assert sum(t["content"].count("<image>") for t in multi[0]["turns"]) == 1
    assert set(PHOTO_CAPTIONS) == set(embedded_photo_names())
    photos = list(photo_samples("val"))
    assert [p["id"] for p in photos] == [f"photo-{n}" for n in embedded_photo_names("val")]
    assert all(p["turns"][0]["content"].startswith("<image>\n") for p in photos)


def test_wrong_captions_move_a_fraction_of_captions_to_other_scenes():
    samples = list(scene_samples(20, "heldout", size=16, qa="none", wrong_captions=0.5))
    assert [s["kind"] for s in samples] == ["caption"] * 20  # qa="none": captions only
    own = {s["scene_seed"]: Scene.random(s["scene_seed"]).caption() for s in samples}
    wrong = [s for s in samples if s["turns"][0]["content"] != f"<image>\n{own[s['scene_seed']]}"]
    assert len(wrong) == 10 and [s["caption_true"] for s in samples].count(False) == 10
    assert all(not s["caption_true"] and s["turns"][0]["content"][8:] in own.values() for s in wrong)
    assert samples == list(scene_samples(20, "heldout", size=16, qa="none", wrong_captions=0.5))  # seeded
    assert "caption_true" not in next(scene_samples(1, "heldout", size=16))
