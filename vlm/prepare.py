"""VLM data to webdataset shards: `python -m vlm.prepare --source KIND:PATH [--source ...] --out DIR`.

Sources (KIND:SPEC):
    llava:FILE[:IMAGE_ROOT]    LLaVA conversation JSON / JSONL (text:FILE is the same reader, for text-only sets)
    captions:FOLDER            image + same-name .txt
    table:FILE[:IMAGE_ROOT]    CSV / TSV with image and caption columns
    tars:PATH                  img2dataset webdataset tars (jpg + txt), a tar or a folder of them
    mmc4:FILE[:IMAGE_ROOT]     interleaved documents (MMC4-style JSONL)
    scenes:N[:SPLIT[:SIZE[:QA[:WRONG]]]]  N procedural scenes (vlm.scenes; split train|heldout, SIZE px (64), QA
                               single (a conversation per question, default), multi (one per scene) or none
                               (captions only); WRONG: the fraction of captions moved to another scene (0))
    photos[:SPLIT]             the embedded photos with their captions (all|train|val)

A shard set:
    shard-000000.tar     per sample: <key>.json (the normalised sample without images, + "num_images") and
                         <key>.<i>.<ext>, image i with its ORIGINAL encoded bytes (tiles are made at load time)
    shard-000000.stats.json   what went into that shard and what was skipped, by source and reason
    manifest.json        totals over the finished shards (rewritten at the end of every run)
    prepare.json         the sources and shard size the set was made with (a resumed run must match)

Sample i of the concatenated source stream (bad samples included) belongs to shard i // shard_size, so shard
membership does not depend on which samples turn out bad, and rank r writes shards with index % world_size == r.
Shards appear complete or not at all (atomic rename); a re-run skips finished shards: resumable.
Nothing here depends on a text tokenizer: turns are stored as text and tokenized at load time.
"""

from __future__ import annotations

import argparse
import collections
import io
import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data.shards import iter_tar_groups, list_shards, shard_path
from lvm.checkpoints import atomic_path
from vlm import formats, scenes

log = logging.getLogger(__name__)

MANIFEST_FILE, SETTINGS_FILE = "manifest.json", "prepare.json"
FORMAT = "vlm-shards-1"
SAMPLE_FIELDS = ("id", "source", "kind", "turns", "num_images")  # in every sample's json; some add qa_type, ...


def samples_from_spec(spec: str) -> Iterator[dict]:
    """The raw (unvalidated) samples of one source spec (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    path, _, image_root = rest.partition(":")
    readers = {
        "llava": lambda: formats.read_llava(path, image_root or None),
        "text": lambda: formats.read_llava(path, image_root or None),
        "captions": lambda: formats.read_caption_folder(path),
        "table": lambda: formats.read_caption_table(path, image_root=image_root or None),
        "tars": lambda: formats.read_caption_tars(path),
        "mmc4": lambda: formats.read_interleaved(path, image_root or None),
        "scenes": lambda: _scenes(rest),
        "photos": lambda: scenes.photo_samples(rest or "all"),
    }
    if kind not in readers or (kind not in ("photos",) and not rest):
        raise ValueError(f"bad source {spec!r}: use KIND:SPEC with KIND one of {', '.join(readers)} (python -m vlm.prepare --help)")
    if kind not in ("scenes", "photos") and not Path(path).exists():
        raise FileNotFoundError(f"source {spec!r}: {path} does not exist")
    return readers[kind]()


def _scenes(rest: str) -> Iterator[dict]:
    fields = rest.split(":")
    count, split, size, qa, wrong = fields + ["", "train", "64", "single", "0"][len(fields) :]
    return scenes.scene_samples(int(count), split, int(size), qa=qa, wrong_captions=float(wrong))


def prepare(
    sources: list[str], out: str | os.PathLike, shard_size: int = 256, rank: int = 0, world_size: int = 1,
    strict: bool = False, progress: bool = True,
) -> dict:  # fmt: skip
    """Write this rank's missing shards of `sources` under `out`; returns the manifest (see module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    out = Path(out)
    claim_settings(out, {"format": FORMAT, "sources": list(sources), "shard_size": shard_size})
    stream = itertools.chain.from_iterable(samples_from_spec(spec) for spec in sources)
    batches = iter(lambda: list(itertools.islice(stream, shard_size)), [])
    written = 0
    for index, raw in enumerate(tqdm(batches, desc=f"shards (rank {rank})", unit="shard", disable=not progress)):
        path = shard_path(out, index)
        if index % world_size != rank or path.exists():
            continue
        write_shard(path, raw, start=index * shard_size, strict=strict)
        written += 1
    manifest = write_manifest(out)
    log.info("rank %d wrote %d shards; %s", rank, written, {k: manifest[k] for k in ("samples", "images", "skipped")})
    return manifest


def claim_settings(out: Path, settings: dict) -> None:
    """Record `settings` in out/prepare.json, or check that a resumed run uses the ones recorded there."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS_FILE
    if path.exists():
        found = json.loads(path.read_text())
        if found != settings:
            raise ValueError(
                f"{out} was prepared with {found}, not {settings}: a resumed run must use the same sources and shard "
                "size (sample i goes to shard i // shard_size). Write into a new directory."
            )
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(settings, indent=2))


def write_shard(path: Path, raw: list[dict], start: int, strict: bool = False) -> dict:
    """Validate `raw` (sample keys numbered from `start`) into the tar at `path`; its stats file first, so a
    finished tar always has one. Returns the stats."""
    skipped: dict[str, formats.SkipStats] = collections.defaultdict(formats.SkipStats)
    samples = []
    for number, sample in enumerate(raw, start):
        try:
            samples.append((f"{number:09d}", formats.check_sample(sample)))  # keys hold no dots (webdataset)
        except formats.BadSample as error:
            skipped[sample["source"]].skip(error, strict)
    stats = {
        "samples": len(samples),
        "images": sum(len(s["images"]) for _, s in samples),
        "per_source": dict(collections.Counter(s["source"] for _, s in samples)),
        "per_kind": dict(collections.Counter(s["kind"] for _, s in samples)),
        "skipped": dict(sum(skipped.values(), collections.Counter())),
        "skipped_per_source": {source: dict(counts) for source, counts in skipped.items()},
    }
    with atomic_path(path.with_suffix(".stats.json")) as tmp:
        Path(tmp).write_text(json.dumps(stats, indent=2))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as writer:
            for key, sample in samples:
                meta = {k: v for k, v in sample.items() if k != "images"} | {"num_images": len(sample["images"])}
                members = {f"{i}.{ext}": data for i, (data, ext) in enumerate(sample["images"])}
                writer.write({"__key__": key, "json": json.dumps(meta).encode(), **members})
    return stats


def write_manifest(out: str | os.PathLike) -> dict:
    """Sum the stats of every finished shard into manifest.json; returns it."""
    out = Path(out)
    shards = {p.name: json.loads(p.with_suffix(".stats.json").read_text()) for p in list_shards(out)}

    def total(field):
        return dict(sum((collections.Counter(s[field]) for s in shards.values()), collections.Counter()))

    manifest = {
        **json.loads((out / SETTINGS_FILE).read_text()),
        "sample_fields": list(SAMPLE_FIELDS),
        "shards": len(shards),
        "samples": sum(s["samples"] for s in shards.values()),
        "images": sum(s["images"] for s in shards.values()),
        "per_source": total("per_source"),
        "per_kind": total("per_kind"),
        "skipped": total("skipped"),
        "skipped_per_source": {
            source: dict(sum((collections.Counter(s["skipped_per_source"].get(source, {})) for s in shards.values()), collections.Counter()))
            for source in sorted({k for s in shards.values() for k in s["skipped_per_source"]})
        },
        "files": {name: {"samples": s["samples"], "images": s["images"]} for name, s in shards.items()},
    }
    with atomic_path(out / MANIFEST_FILE) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a VLM shard set; make one with `python -m vlm.prepare`")
    return json.loads(path.read_text())


def iter_shard_samples(
    shard_path: str | os.PathLike, stats: formats.SkipStats | None = None, decode: bool = True
) -> Iterator[tuple[dict, list]]:
    """(sample, images) per sample of a shard, in order: the sample's json (+ "key"), its images as PIL images
    (decode=False: the stored encoded bytes). A sample that cannot be read is skipped and counted in `stats`
    by reason ("corrupt_shard", "bad_record", "missing_image", "corrupt_image") and logged; never raises."""
    stats = formats.SkipStats() if stats is None else stats
    for key, members in iter_tar_groups(shard_path):
        try:
            if members is None:
                raise formats.BadSample("corrupt_shard", f"shard {shard_path} ends early ({key}); the rest is skipped")
            try:
                sample = json.loads(members["json"]) | {"key": key}
                count = int(sample["num_images"])
            except (KeyError, ValueError, TypeError) as error:
                raise formats.BadSample("bad_record", f"shard {shard_path} sample {key!r}: no readable json ({error!r})") from error
            encoded = [_member(members, i, shard_path, key) for i in range(count)]
            yield sample, [_decode(data, shard_path, key) for data in encoded] if decode else encoded
        except formats.BadSample as error:
            stats.skip(error, strict=False)


def _member(members: dict[str, bytes], i: int, shard: object, key: str) -> bytes:
    for name, data in members.items():
        if name.partition(".")[0] == str(i) and name != "json":
            return data
    raise formats.BadSample("missing_image", f"shard {shard} sample {key!r}: image {i} is missing")


def _decode(data: bytes, shard: object, key: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise formats.BadSample("corrupt_image", f"shard {shard} sample {key!r}: an image cannot be decoded ({error})") from error


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", required=True, help="KIND:SPEC (repeatable; see above)")
    parser.add_argument("--out", required=True, help="output directory of the shard set")
    parser.add_argument("--shard-size", type=int, default=256, help="source samples per shard (bad ones included)")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = prepare(args.source, args.out, args.shard_size, args.rank, args.world_size, args.strict)
    print(json.dumps({k: manifest[k] for k in ("shards", "samples", "images", "per_source", "skipped")}))
    return manifest


if __name__ == "__main__":
    main()
