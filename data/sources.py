"""Where sentences come from: image folders, paired folders, videos, frame folders, embedded demo data.

Every source is deterministic (sorted paths, seeded choices), because resuming a tokenization run
relies on the sentence stream being the same every time. `sentences_from_spec` turns the short
strings that `python -m data.tokenize --source ...` takes into a sentence stream.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from data.photos import embedded_photo, embedded_photo_names
from data.procedural import TASKS, moving_shapes, procedural_analogy, procedural_seeds
from data.sentences import (
    IMAGES_PER_SENTENCE,
    Sentence,
    analogy_sentences,
    colorization_pair,
    inpainting_pair,
    segmentation_sentences,
    sequence_sentences,
    single_sentences,
)

log = logging.getLogger(__name__)

# every format PIL can open (not the save-only ones such as .pdf)
IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root`, recursively, in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def paired_files(images_root: str | os.PathLike, annotations_root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs matched by path stem relative to each root (a/b/x.jpg <-> a/b/x.png).

    Files without a partner are skipped and counted in a warning: annotation sets are often partial.
    """
    def by_stem(root):
        return {p.relative_to(root).with_suffix(""): p for p in list_images(root)}

    images, annotations = by_stem(Path(images_root)), by_stem(Path(annotations_root))
    common = sorted(images.keys() & annotations.keys())
    unmatched = len(images) + len(annotations) - 2 * len(common)
    if unmatched:
        log.warning("%d files in %s / %s have no partner and are skipped", unmatched, images_root, annotations_root)
    return [(images[k], annotations[k]) for k in common]


def video_frames(path: str | os.PathLike, every: int = 1, max_frames: int | None = None) -> list[Image.Image]:
    """Decoded RGB frames of a video file (PyAV), keeping every `every`-th frame."""
    import av

    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:  # e.g. an mp4 cut before its index (moov atom)
                raise ValueError(f"video {path} has no readable video stream; is the file complete?")
            decoded = container.decode(video=0)
            for frame in itertools.islice(decoded, 0, None if max_frames is None else max_frames * every, every):
                frames.append(frame.to_image())
    except av.error.FFmpegError as error:  # cut short or damaged: keep what decoded before the damage
        if not frames:
            raise ValueError(f"video {path} cannot be decoded ({error})") from error
        log.warning("video %s ends early after %d frames (%s); using those frames", path, len(frames), error)
    return frames


def frame_folders(root: str | os.PathLike) -> dict[Path, list[Path]]:
    """Folders of frames under `root` (each folder holding images is one video), frames sorted by name."""
    videos: dict[Path, list[Path]] = {}
    for path in list_images(root):
        videos.setdefault(path.parent, []).append(path)
    return videos


def _counted(sentences: Iterator, path: Path) -> Iterator:
    """The sentences of one video, with a warning when it is too short to give any."""
    empty = True
    for sentence in sentences:
        empty = False
        yield sentence
    if empty:
        log.warning("video %s has too few frames for one sentence at this length and stride; skipped", path)


def _video_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)


def sentences_from_spec(
    spec: str,
    split: str = "train",
    image_size: int = 256,
    images_per_sentence: int = IMAGES_PER_SENTENCE,
    count: int | None = None,
    seed: int = 0,
    stride: int = 1,
    max_stride: int | None = None,
) -> Iterator[Sentence]:
    """A sentence stream from a source spec (at most `count` sentences):

        photos                       the embedded photos of `split` ("train" / "val"), one per sentence
        procedural[:TASK,TASK..]     procedural analogies, tasks in turn (all TASKS by default);
                                     seeds from the `split` range ("train" / "heldout"), `count` needed
        moving_shapes                procedural videos with known motion, `count` needed
        folder:DIR                   every image under DIR, one per sentence
        paired:IMAGES:ANNOTATIONS:TASK   analogies; TASK "segmentation" reads annotations as class maps
        colorize:DIR / inpaint:DIR   analogies derived from the images under DIR
        video:PATH                   sequences from a video file or every video under a folder
        frames:DIR                   sequences from folders of frames
    """
    kind, _, arg = spec.partition(":")
    n_shots = images_per_sentence // 2
    if kind in ("procedural", "moving_shapes") and count is None:
        raise ValueError(f"source {spec!r} is unbounded: give a count (--count N)")
    if kind == "photos":
        names = embedded_photo_names("val" if split in ("val", "heldout") else split)
        stream: Iterable[Sentence] = single_sentences([embedded_photo(n) for n in names], "photos")
    elif kind == "procedural":
        tasks = arg.split(",") if arg else list(TASKS)
        seeds = procedural_seeds(split, count, start=seed)
        stream = (procedural_analogy(tasks[i % len(tasks)], s, n_shots, image_size) for i, s in enumerate(seeds))
    elif kind == "moving_shapes":
        seeds = procedural_seeds(split, count, start=seed)
        stream = (moving_shapes(s, images_per_sentence, image_size)[0] for s in seeds)
    elif kind == "folder":
        stream = single_sentences(list_images(arg), arg)
    elif kind == "paired":
        images_root, annotations_root, task = arg.split(":")
        pairs = paired_files(images_root, annotations_root)
        if task == "segmentation":
            stream = segmentation_sentences(pairs, images_root, n_shots, seed)
        else:
            stream = analogy_sentences(pairs, task, images_root, n_shots)
    elif kind == "colorize":
        stream = analogy_sentences([colorization_pair(p) for p in list_images(arg)], "colorize", arg, n_shots)
    elif kind == "inpaint":
        pairs = [inpainting_pair(p, seed + i) for i, p in enumerate(list_images(arg))]
        stream = analogy_sentences(pairs, "inpaint", arg, n_shots)
    elif kind == "video":
        stream = (
            s
            for path in _video_files(Path(arg))
            for s in _counted(sequence_sentences(video_frames(path), str(path), images_per_sentence, stride, max_stride, seed), path)
        )
    elif kind == "frames":
        stream = (
            s
            for folder, frames in frame_folders(arg).items()
            for s in sequence_sentences(frames, str(folder), images_per_sentence, stride, max_stride, seed)
        )
    else:
        raise ValueError(
            f"unknown source {spec!r}; valid kinds: photos, procedural[:TASKS], moving_shapes, folder:DIR, "
            "paired:IMAGES:ANNOTATIONS:TASK, colorize:DIR, inpaint:DIR, video:PATH, frames:DIR"
        )
    return itertools.islice(stream, count)
