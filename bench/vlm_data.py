"""VLM data path throughput on one worker: samples/s from shards to model-ready ids and pixel tiles.

    python bench/vlm_data.py [--source scenes:300 --source photos] [--tiling internvl --tile-size 224 --max-tiles 6]

Prepares the sources with `vlm.prepare` (not timed), then times, per sample, what one DataLoader worker
does: decode the stored images (`iter_shard_samples`), tile and normalise them (`vlm.processing.
ImageProcessor`), tokenize the turns with answer-only labels (`vlm.text.encode_turns`, the default BPE)
and expand each `<image>` to its token count (`vlm.splice.expand_placeholders`). Time per stage is
reported as a share of the total. Times are this process's CPU time (time.process_time), so that other
load on a shared machine does not count; with --threads 1 that is the worker's work. Packing into rows belongs to the datamodule (vlm/data.py) and is not
timed here. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.shards import list_shards  # noqa: E402
from vlm.formats import SkipStats  # noqa: E402
from vlm.prepare import iter_shard_samples, prepare  # noqa: E402
from vlm.processing import ImageProcessor  # noqa: E402
from vlm.splice import expand_placeholders  # noqa: E402
from vlm.text import IMAGE_TOKEN, encode_turns, train_default_tokenizer  # noqa: E402


def full_path(shards: list[Path], processor: ImageProcessor, tokenizer_dir: Path, seq_len: int, batch_size: int) -> dict:
    """VLMStream end to end: samples (documents in rows), tiles and non-pad tokens per CPU second."""
    from data.datamodule import ShardSet
    from vlm.data import VLMStream

    sources = sorted({s["source"] for shard in shards for s, _ in iter_shard_samples(shard, decode=False)})
    stream = VLMStream([ShardSet(shards)], seq_len, batch_size, str(tokenizer_dir), processor, sources, shuffle_buffer=64)
    start, samples, tiles, tokens = time.process_time(), 0, 0, 0
    for batch in stream:
        documents = batch["document_ids"]
        samples += int((documents.max(dim=1).values + 1).sum())
        tiles += batch["pixel_values"].shape[0]
        tokens += int((documents >= 0).sum())
    seconds = time.process_time() - start
    return {"samples": samples, "samples_per_s": samples / seconds, "tiles_per_s": tiles / seconds, "tokens_per_s": tokens / seconds}


def stages(shards: list[Path], processor: ImageProcessor, tokenizer) -> dict:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    seconds = dict.fromkeys(("decode", "tile", "tokenize", "expand"), 0.0)
    samples = tiles = tokens = 0
    for shard in shards:
        reader = iter_shard_samples(shard, SkipStats())
        while True:
            start = time.process_time()
            pair = next(reader, None)
            seconds["decode"] += time.process_time() - start
            if pair is None:
                break
            sample, images = pair
            start = time.process_time()
            processed = processor(images)
            seconds["tile"] += time.process_time() - start
            start = time.process_time()
            ids, labels = encode_turns(tokenizer, sample["turns"])
            seconds["tokenize"] += time.process_time() - start
            start = time.process_time()
            ids = expand_placeholders(ids, image_id, processed.tokens_per_image)
            seconds["expand"] += time.process_time() - start
            samples, tiles, tokens = samples + 1, tiles + processed.pixel_values.shape[0], tokens + len(ids)
    total = sum(seconds.values())
    return {
        "samples": samples,
        "samples_per_s": samples / total,
        "tiles_per_s": tiles / total,
        "tokens_per_s": tokens / total,
        "share": {stage: round(s / total, 3) for stage, s in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", help="vlm.prepare sources (default: scenes:300 and photos)")
    parser.add_argument("--tiling", default="internvl", help="none | internvl | anyres | catty")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--max-tiles", type=int, default=6)
    parser.add_argument("--tokens-per-tile", type=int, default=64, help="what the connector gives per tile")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one DataLoader worker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sources = args.source or ["scenes:300", "photos"]
    processor = ImageProcessor(args.tile_size, args.tokens_per_tile, tiling=args.tiling, max_tiles=args.max_tiles)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_default_tokenizer(Path(tmp) / "tokenizer")
        prepare(sources, Path(tmp) / "shards", progress=False)
        shards = list_shards(Path(tmp) / "shards")
        full = full_path(shards, processor, Path(tmp) / "tokenizer", args.seq_len, args.batch_size)
        parts = stages(shards, processor, tokenizer)
    print(f"sources {', '.join(sources)}; tiling {args.tiling} {args.tile_size}px <= {args.max_tiles} tiles; one worker, CPU time")
    print(f"full path (VLMStream, rows of {args.seq_len}): {full['samples']} samples, {full['samples_per_s']:.0f} samples/s, "
          f"{full['tiles_per_s']:.0f} tiles/s, {full['tokens_per_s'] / 1e3:.0f}k tokens/s")  # fmt: skip
    print(f"stages without packing: {parts['samples_per_s']:.0f} samples/s; time share {parts['share']}")
    result = {**full, "stages_samples_per_s": parts["samples_per_s"], "share": parts["share"]}
    print(json.dumps({"bench": "vlm_data", **{k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}}))


if __name__ == "__main__":
    main()
