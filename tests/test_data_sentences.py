"""Sentence layouts of every kind, and procedural tasks whose answers are what the task says."""

import numpy as np
import pytest
from PIL import Image

from data.procedural import (
    COLORS,
    RECOLOR,
    TASKS,
    moving_shapes,
    procedural_analogy,
    procedural_seeds,
)
from data.sentences import (
    ANALOGY,
    ANNOTATED_SEQUENCE,
    CATEGORY,
    MULTITASK,
    SEQUENCE,
    SINGLE,
    analogy_sentences,
    annotated_sequence_sentences,
    category_sentences,
    colorization_pair,
    inpainting_pair,
    multitask_sentences,
    resolve_image,
    segmentation_sentences,
    sequence_sentences,
    single_sentences,
)
from data.sources import paired_files, sentences_from_spec, video_frames


def arr(image):
    return np.asarray(resolve_image(image)).astype(int)


def test_single_and_category_layouts():
    singles = list(single_sentences(["a", "b", "c"], "src"))
    assert [(s.kind, s.images) for s in singles] == [(SINGLE, ["a"]), (SINGLE, ["b"]), (SINGLE, ["c"])]
    groups = {"cat": [f"c{i}" for i in range(5)], "dog": ["d0", "d1"]}
    cats = list(category_sentences(groups, "src", images_per_sentence=4))
    assert [(s.kind, s.task, len(s.images)) for s in cats] == [(CATEGORY, "cat", 4), (CATEGORY, "cat", 1), (CATEGORY, "dog", 2)]
    assert sorted(im for s in cats[:2] for im in s.images) == groups["cat"]


def test_sequence_windows_fixed_and_random_stride():
    frames = list(range(40))
    fixed = list(sequence_sentences(frames, "v", length=4, stride=3))
    assert [s.images for s in fixed] == [[0, 3, 6, 9], [10, 13, 16, 19], [20, 23, 26, 29], [30, 33, 36, 39]]
    assert all(s.kind == SEQUENCE for s in fixed)
    random = list(sequence_sentences(frames, "v", length=4, max_stride=4, seed=1))
    for s in random:
        steps = np.diff(s.images)
        assert len(set(steps)) == 1 and 1 <= steps[0] <= 4 and steps[0] == s.meta["stride"]
    assert len({s.meta["stride"] for s in random}) > 1  # strides really vary


def test_analogy_segmentation_colorization_inpainting_layouts():
    pairs = [(f"x{i}", f"y{i}") for i in range(5)]
    sentences = list(analogy_sentences(pairs, "depth", "src", n_shots=2))
    assert [s.images for s in sentences] == [["x0", "y0", "x1", "y1"], ["x2", "y2", "x3", "y3"], ["x4", "y4"]]
    assert all(s.kind == ANALOGY and s.task == "depth" for s in sentences)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    labels = Image.fromarray(np.repeat(np.arange(4, dtype=np.uint8), 4)[None].repeat(16, 0))
    seg = list(segmentation_sentences([(image, labels)] * 4, "src", n_shots=2, seed=0))
    masks = [arr(s.images[1]) for s in seg]
    for mask in masks:  # one colour per class, class 0 black
        assert (mask[:, :4] == 0).all() and len({tuple(mask[0, 4 * c]) for c in range(4)}) == 4
    assert not np.array_equal(masks[0], masks[1])  # a fresh palette per sentence
    assert np.array_equal(arr(seg[0].images[1]), arr(seg[0].images[3]))  # but fixed within one

    gray, color = colorization_pair(image)
    g = arr(gray)
    assert color is image and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    masked, original = inpainting_pair(image, seed=3)
    changed = (arr(masked) != arr(original)).any(-1)
    assert original is image and 0 < changed.mean() <= 0.25 and (arr(masked)[changed] == 128).all()


def test_multitask_and_annotated_sequence_layouts():
    shots = [{m: f"{m}{i}" for m in ("image", "depth", "normals")} for i in range(10)]
    sentences = list(multitask_sentences(shots, "src", images_per_sentence=6, seed=0))
    assert all(s.kind == MULTITASK for s in sentences) and len(sentences) == 5
    for s in sentences:
        order = s.meta["order"]
        assert sorted(order) == ["depth", "image", "normals"] and s.task == "+".join(order)
        assert [im.rstrip("0123456789") for im in s.images] == order * 2
    assert len({tuple(s.meta["order"]) for s in sentences}) > 1  # order shuffled per sentence

    frames, annotations = [f"f{i}" for i in range(6)], [f"a{i}" for i in range(6)]
    inter = list(annotated_sequence_sentences(frames, annotations, "flow", "v", frames_per_sentence=3))
    assert [s.images for s in inter] == [["f0", "a0", "f1", "a1", "f2", "a2"], ["f3", "a3", "f4", "a4", "f5", "a5"]]
    apart = list(annotated_sequence_sentences(frames, annotations, "flow", "v", 3, interleave=False))
    assert apart[0].images == ["f0", "f1", "f2", "a0", "a1", "a2"] and apart[0].kind == ANNOTATED_SEQUENCE


@pytest.mark.parametrize("task", TASKS)
def test_procedural_answers(task):
    sentence = procedural_analogy(task, seed=5, n_shots=3, size=48)
    assert sentence.kind == ANALOGY and sentence.task == task and len(sentence.images) == 6
    assert all(im.size == (48, 48) for im in sentence.images)
    again = procedural_analogy(task, seed=5, n_shots=3, size=48)
    assert all(np.array_equal(arr(a), arr(b)) for a, b in zip(sentence.images, again.images, strict=True))
    query, answer = arr(sentence.prompt[-1]), arr(sentence.answer)
    if task == "flip":
        assert np.array_equal(answer, query[:, ::-1])
    elif task == "colorize":
        assert np.array_equal(query, arr(Image.fromarray(answer.astype(np.uint8)).convert("L").convert("RGB")))
    elif task == "inpaint":
        changed = (query != answer).any(-1)
        assert changed.any() and (query[changed] == 128).all()
    elif task == "recolor":
        assert not np.array_equal(query, answer)
        for index, colour in enumerate(COLORS):  # backgrounds are never shape colours
            assert (answer[(query == colour).all(-1)] == COLORS[RECOLOR[index]]).all()
    elif task == "edges":
        assert set(np.unique(answer)) <= {0, 255} and (answer == 255).any()
    elif task == "segmentation":
        background = (answer == 0).all(-1)
        assert background.any() and (~background).any() and len({tuple(c) for c in answer[~background]}) <= 3


def test_procedural_split_seeds_never_overlap():
    train, held = set(procedural_seeds("train", 1000)), set(procedural_seeds("heldout", 1000))
    assert not train & held
    assert procedural_analogy("flip", max(held), 1, 16).meta["split"] == "heldout"
    with pytest.raises(ValueError, match="below"):
        procedural_seeds("train", 10, start=10**9)


def test_moving_shapes_have_constant_known_velocity():
    seed = next(s for s in range(100) if len(moving_shapes(s, 2, 8)[1]) == 1)  # one shape: centroid = its position
    video, motions = moving_shapes(seed, n_frames=6, size=64)
    assert video.kind == SEQUENCE and len(video.images) == 6
    background = arr(video.images[0])[0, 0]
    centroids = [np.argwhere((arr(f) != background).any(-1)).mean(0)[::-1] for f in video.images]
    assert np.allclose(np.diff(centroids, axis=0), [motions[0].dx, motions[0].dy], atol=1.0)
    frames = np.stack([arr(f) for f in video.images])
    assert (frames[1:] != frames[:-1]).any()  # things move


def test_sources_folders_pairs_video_and_specs(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("img/a", "ann/a"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("x", "y"):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"img/a/{name}.jpg")
        Image.fromarray(rng.integers(0, 3, (8, 8), dtype=np.uint8)).save(tmp_path / f"ann/a/{name}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "img/a/unpaired.png")
    pairs = paired_files(tmp_path / "img", tmp_path / "ann")
    assert [(p[0].stem, p[1].stem) for p in pairs] == [("x", "x"), ("y", "y")]
    seg = list(sentences_from_spec(f"paired:{tmp_path / 'img'}:{tmp_path / 'ann'}:segmentation", images_per_sentence=4))
    assert len(seg) == 1 and [im.size for im in seg[0].resolved()] == [(8, 8)] * 4
    assert len(list(sentences_from_spec(f"folder:{tmp_path / 'img'}"))) == 3

    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert len(video_frames(path)) == 12
    clips = list(sentences_from_spec(f"video:{path}", images_per_sentence=4, stride=2))
    assert len(clips) == 1 and clips[0].meta["stride"] == 2
    assert len(list(sentences_from_spec("procedural:flip,edges", count=4, image_size=16))) == 4
    with pytest.raises(ValueError, match="count"):
        sentences_from_spec("procedural")
