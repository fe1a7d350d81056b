"""vlm.scene_check: true renders score 1, renders of other scenes near chance, each attribute fails alone when
only it is wrong, and a lossy round trip keeps the score high."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.scene_check import attribute_accuracy, check_image, find_objects
from vlm.scenes import SHAPES, Scene, scene_seeds

SCENES = [Scene.random(seed) for seed in scene_seeds("heldout", 120)]


@pytest.mark.parametrize("size", [32, 64])
def test_true_renders_score_one_and_other_scenes_near_chance(size):
    images = [scene.render(size) for scene in SCENES]
    scores = attribute_accuracy(images, SCENES)
    assert scores == {"color": 1.0, "shape": 1.0, "position": 1.0, "accuracy": 1.0, "judgements": scores["judgements"]}
    # one colour, one shape and one position judgement per described shape
    assert scores["judgements"] == 3 * sum(len(scene.shapes) for scene in SCENES)
    shifted = attribute_accuracy(images[1:] + images[:1], SCENES)  # each caption scored on the next scene
    # chance: a colour is present ~1/3 of the time, then its kind matches 1/3, its place rarely
    assert 0.25 < shifted["color"] < 0.5 and shifted["shape"] < 0.25 and shifted["position"] < 0.15
    assert shifted["accuracy"] < 0.3


def test_each_attribute_fails_alone():
    scene = next(s for s in SCENES if len(s.shapes) == 1 and s.shapes[0].slot == "left")
    (shape,) = scene.shapes
    other_kind = dataclasses.replace(shape, kind=SHAPES[(SHAPES.index(shape.kind) + 1) % 3])
    assert check_image(dataclasses.replace(scene, shapes=(other_kind,)).render(32), scene) == {
        "color": [True], "shape": [False], "position": [True]}
    mirrored = scene.render(32).transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # now on the right
    assert check_image(mirrored, scene) == {"color": [True], "shape": [True], "position": [False]}
    recoloured = dataclasses.replace(shape, color="red" if shape.color != "red" else "blue")
    assert check_image(dataclasses.replace(scene, shapes=(recoloured,)).render(32), scene) == {
        "color": [False], "shape": [False], "position": [False]}  # no object of the described colour at all


def test_relations_are_judged_between_the_described_colours():
    scene = next(s for s in SCENES if len(s.shapes) == 2 and {s.shapes[0].slot, s.shapes[1].slot} == {"left", "right"})
    assert all(check_image(scene.render(32), scene)["position"])
    swapped = check_image(scene.render(32).transpose(Image.Transpose.FLIP_LEFT_RIGHT), scene)
    assert swapped["position"] == [False, False] and all(swapped["color"]) and all(swapped["shape"])


def test_a_lossy_round_trip_keeps_most_attributes():
    """Down to half size and back, plus noise: the kind of blur and colour error a 4x VQ decode shows."""
    rng = np.random.default_rng(0)
    images = []
    for scene in SCENES:
        small = scene.render(64).resize((16, 16), Image.BILINEAR).resize((32, 32), Image.BILINEAR)
        noisy = np.asarray(small, np.float32) + rng.normal(0, 12, (32, 32, 3))
        images.append(torch.from_numpy(noisy.clip(0, 255) / 255).permute(2, 0, 1).float())
    scores = attribute_accuracy(images, SCENES)
    assert scores["color"] > 0.95 and scores["accuracy"] > 0.8


def test_empty_images_and_bad_input():
    scene = SCENES[0]
    assert find_objects(Image.new("RGB", (32, 32), (245, 245, 240))) == {}
    assert not any(any(v) for v in check_image(Image.new("RGB", (32, 32), (245, 245, 240)), scene).values())
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        check_image(torch.zeros(32, 32, 3), scene)
    with pytest.raises(ValueError, match="one image per scene"):
        attribute_accuracy([scene.render(32)], SCENES[:2])
