"""Readers of the VLM data formats users already have, all yielding one normalised sample shape:

    {"id": str, "source": str, "kind": "conversation" | "caption" | "interleaved" | "text",
     "turns": [{"role": "system" | "user" | "assistant" | "text", "content": "...<image>..."}],
     "images": [path or bytes, ...]}          # one per <image> marker, in reading order

    read_llava(path, image_root)      LLaVA conversation JSON / JSONL ({"id", "image": str | list,
                                      "conversations": [{"from": "human" | "gpt" | "system", "value"}]});
                                      samples without "image" are text-only conversations (kind "text")
    read_caption_folder(root)         image + same-name .txt caption
    read_caption_table(path, ...)     CSV / TSV with an image path column and a caption column
    read_caption_tars(path)           img2dataset webdataset tars (jpg/png/webp + txt), a tar or a folder of them
    read_interleaved(path, image_root)  interleaved documents: MMC4 ({"text_list", "image_info": [{"image_name",
                                      "matched_text_index"}]}) or OBELICS ({"texts", "images"} parallel lists)

`validated(samples, stats, strict)` turns images into their original encoded bytes and drops bad samples
(missing or corrupt image, `<image>` markers that do not match the images), counting and logging why.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from data.shards import iter_tar_groups
from data.sources import list_images
from vlm.text import IMAGE_TOKEN

log = logging.getLogger(__name__)

KINDS = ("conversation", "caption", "interleaved", "text")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}


class BadSample(ValueError):
    """A sample that cannot be trained on; `reason` is the counter's key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkipStats(collections.Counter):
    """Skipped samples by reason ("missing_image", "corrupt_image", "no_image_placeholder",
    "too_many_placeholders", "too_few_placeholders", "bad_record", ...)."""

    def skip(self, error: BadSample, strict: bool) -> None:
        if strict:
            raise error
        self[error.reason] += 1
        log.warning("skipped: %s", error)


# -- readers --------------------------------------------------------------------------------------------
def read_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line or index, record) of a JSON list or a JSONL file; a line that is not JSON comes as None."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError:
                    yield number, None
    else:
        yield from enumerate(json.loads(text))


def read_llava(path: str | os.PathLike, image_root: str | os.PathLike | None = None, source: str | None = None) -> Iterator[dict]:
    """LLaVA / ShareGPT conversations; image paths relative to `image_root` (default: the file's folder).
    A malformed record is yielded as {"error": BadSample} so that `validated` counts it."""
    path = Path(path)
    root, source = Path(image_root) if image_root else path.parent, source or path.stem
    for index, record in read_records(path):
        try:
            conversations = record["conversations"]
            turns = [{"role": LLAVA_ROLES[t["from"]], "content": str(t["value"])} for t in conversations]
            images = record.get("image") or []
        except (KeyError, TypeError) as error:
            yield {"id": f"{path.name}:{index}", "source": source, "error": BadSample("bad_record", f"{path} record {index}: not a LLaVA conversation ({error!r})")}
            continue
        images = [images] if isinstance(images, str) else list(images)
        yield {
            "id": str(record.get("id", f"{path.stem}-{index}")),
            "source": source,
            "kind": "conversation" if images else "text",
            "turns": turns,
            "images": [root / name for name in images],
        }


def _caption_sample(id: str, source: str, image, caption: str) -> dict:
    return {"id": id, "source": source, "kind": "caption", "turns": [{"role": "text", "content": f"{IMAGE_TOKEN}\n{caption.strip()}"}], "images": [image]}


def read_caption_folder(root: str | os.PathLike, source: str | None = None) -> Iterator[dict]:
    """Every image under `root` with a .txt of the same name beside it (images without one are counted)."""
    root = Path(root)
    for image in list_images(root):
        caption = image.with_suffix(".txt")
        if not caption.exists():
            yield {"id": str(image.relative_to(root)), "source": source or root.name, "error": BadSample("missing_caption", f"{image} has no caption file {caption.name}")}
            continue
        yield _caption_sample(str(image.relative_to(root).with_suffix("")), source or root.name, image, caption.read_text(encoding="utf-8"))


def read_caption_table(
    path: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None,
    image_root: str | os.PathLike | None = None, source: str | None = None,
) -> Iterator[dict]:  # fmt: skip
    """CSV (or TSV, by extension) with a header; columns default to the first of image/image_path/filepath/
    file/path and caption/text/title/description found."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = reader.fieldnames or []
        image_column = image_column or _first(columns, ("image", "image_path", "filepath", "file", "path"), path, "image")
        caption_column = caption_column or _first(columns, ("caption", "text", "title", "description"), path, "caption")
        for row_number, row in enumerate(reader, 2):
            yield _caption_sample(f"{path.stem}-{row_number}", source or path.stem, root / row[image_column], row[caption_column] or "")


def _first(columns: list[str], candidates: tuple[str, ...], path: Path, what: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"{path}: no {what} column among {columns}; name it with {what}_column=... (one of {candidates} is found by itself)")


def read_caption_tars(path: str | os.PathLike, source: str | None = None) -> Iterator[dict]:
    """img2dataset's webdataset output: members <key>.jpg (or png/webp) + <key>.txt; `path` a tar or a
    folder of them. A truncated tar ends early and is counted as "corrupt_shard"."""
    path = Path(path)
    tars = [path] if path.is_file() else sorted(p for p in path.glob("*.tar") if not p.name.startswith("."))
    for tar in tars:
        for key, members in iter_tar_groups(tar):
            if members is None:
                yield {"id": tar.name, "source": source or path.stem, "error": BadSample("corrupt_shard", f"{tar} is truncated or corrupt ({key})")}
                continue
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            if image is None or "txt" not in members:
                yield {"id": key, "source": source or path.stem, "error": BadSample("missing_image" if image is None else "missing_caption", f"{tar} sample {key} lacks an image or a .txt caption")}
                continue
            yield _caption_sample(key, source or path.stem, image, members["txt"].decode("utf-8"))


def read_interleaved(path: str | os.PathLike, image_root: str | os.PathLike | None = None, source: str | None = None) -> Iterator[dict]:
    """Interleaved documents, one per JSON(L) record, image names relative to image_root (default: the
    file's folder). Two layouts: MMC4 (sentences `text_list`, images `image_info` with `image_name` and
    `matched_text_index`, each image placed before its sentence) and OBELICS (parallel lists `texts` and
    `images`, one of the two None at each position)."""
    path = Path(path)
    root, source = Path(image_root) if image_root else path.parent, source or path.stem
    for index, record in read_records(path):
        try:
            items = _obelics_items(record) if "texts" in record else _mmc4_items(record)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            yield {"id": f"{path.name}:{index}", "source": source, "error": BadSample("bad_record", f"{path} record {index}: not an MMC4 or OBELICS document ({error!r})")}
            continue
        content = " ".join(f"{IMAGE_TOKEN}\n" if is_image else text for is_image, text in items).replace("\n ", "\n")
        yield {
            "id": str(record.get("id") or record.get("url") or f"{path.stem}-{index}"),
            "source": source,
            "kind": "interleaved",
            "turns": [{"role": "text", "content": content}],
            "images": [root / name for is_image, name in items if is_image],
        }


def _mmc4_items(record: dict) -> list[tuple[bool, str]]:
    """(is_image, text or image name) in reading order."""
    texts = [str(t) for t in record["text_list"]]
    before: dict[int, list[str]] = collections.defaultdict(list)
    for info in record.get("image_info") or []:
        position = int(info["matched_text_index"])
        if not 0 <= position < len(texts):
            raise ValueError(f"image {info['image_name']} matched to sentence {position} of {len(texts)}")
        before[position].append(info["image_name"])
    return [item for i, text in enumerate(texts) for item in [*((True, n) for n in before[i]), (False, text)]]


def _obelics_items(record: dict) -> list[tuple[bool, str]]:
    texts, images = record["texts"], record["images"]
    if len(texts) != len(images) or any((t is None) == (i is None) for t, i in zip(texts, images, strict=True)):
        raise ValueError("texts and images must be parallel lists with exactly one of the two set at each position")
    return [(True, i) if t is None else (False, str(t)) for t, i in zip(texts, images, strict=True)]


# -- validation -----------------------------------------------------------------------------------------
def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes, after decoding them fully (raises on corrupt data)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return PIL_EXTENSIONS.get(image.format, (image.format or "bin").lower())


def check_sample(sample: dict) -> dict:
    """The sample with its images as (bytes, extension) pairs; raises BadSample saying what is wrong."""
    if "error" in sample:
        raise sample["error"]
    where = f"sample {sample['id']!r} of {sample['source']}"
    markers = sum(turn["content"].count(IMAGE_TOKEN) for turn in sample["turns"])
    n = len(sample["images"])
    if markers != n:
        if markers == 0:
            raise BadSample("no_image_placeholder", f"{where}: {n} image(s) but no {IMAGE_TOKEN} in the text; put one {IMAGE_TOKEN} where each image goes")
        reason = "too_many_placeholders" if markers > n else "too_few_placeholders"
        raise BadSample(reason, f"{where}: {markers} {IMAGE_TOKEN} placeholders but {n} image(s); one placeholder per image")
    if not any(turn["role"] in ("assistant", "text") for turn in sample["turns"]):
        raise BadSample("nothing_to_learn", f"{where}: no assistant or text turn, nothing to train on")
    images = []
    for image in sample["images"]:
        if not isinstance(image, bytes):
            if not Path(image).is_file():
                raise BadSample("missing_image", f"{where}: image {image} does not exist")
            image = Path(image).read_bytes()
        try:
            images.append((image, image_extension(image)))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise BadSample("corrupt_image", f"{where}: an image cannot be decoded ({error})") from error
    return {**sample, "images": images}


def validated(samples: Iterable[dict], stats: SkipStats, strict: bool = False) -> Iterator[dict]:
    """Samples that pass `check_sample`, images as (bytes, extension); the others counted in `stats` by
    reason and logged (raised when strict)."""
    for sample in samples:
        try:
            yield check_sample(sample)
        except BadSample as error:
            stats.skip(error, strict)
