"""Tokenize a sentence stream into webdataset shards: `python -m data.tokenize --source ... --out DIR`.

Sentence i of the stream goes to shard i // samples_per_shard; with several processes (ranks),
rank r writes the shards with index % world_size == r. A shard is written to a temp name and
renamed when complete, so re-running the same command skips the finished shards and redoes only
the missing ones: an interrupted run resumes with no duplicates and no gaps. The sentence stream
must therefore be deterministic (every source in data.sources is).

    python -m data.tokenize --source procedural:flip,recolor --count 2000 --tokenizer vqgan_demo \
        --image-size 64 --out shards/procedural-train
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.sentences import Sentence
from data.shards import TokenSample, claim_dataset_info, shard_path, write_manifest, write_shard
from data.sources import sentences_from_spec
from tokenizer import VQGAN, to_tensor


def tokenizer_info(vq: VQGAN) -> dict:
    """What identifies a tokenizer's token ids: stored in every shard set and every sample."""
    return {
        "tokenizer": vq.config.name,
        "codebook_size": vq.config.codebook_size,
        "tokens_per_image": vq.config.tokens_per_image,
    }


def encode_sentences(vq: VQGAN, sentences: list[Sentence], batch_size: int = 64) -> list[np.ndarray]:
    """Sentences -> uint16 [n_images, tokens_per_image] each, encoding all their images in batches."""
    if vq.config.codebook_size > 65536:
        raise ValueError(f"codebook size {vq.config.codebook_size} does not fit the uint16 shard format")
    images = [image for sentence in sentences for image in sentence.resolved()]
    device = next(vq.parameters()).device
    codes = []
    for start in range(0, len(images), batch_size):
        batch = to_tensor(images[start : start + batch_size], size=vq.config.resolution).to(device)
        codes.append(vq.encode(batch).cpu())
    flat = torch.cat(codes).numpy().astype(np.uint16)
    splits = np.cumsum([len(s.images) for s in sentences])[:-1]
    return np.split(flat, splits)


def _shard_groups(sentences: Iterable[Sentence], samples_per_shard: int) -> Iterator[tuple[int, list[Sentence]]]:
    iterator = iter(sentences)
    for index in itertools.count():
        group = list(itertools.islice(iterator, samples_per_shard))
        if not group:
            return
        yield index, group


def tokenize_to_shards(
    sentences: Iterable[Sentence],
    vq: VQGAN,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 256,
    prefix: str = "shard",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Encode `sentences` into shards under `out_dir`; returns {"written", "skipped", "images", "seconds"}.

    Finished shards (resume) and shards of other ranks are skipped without encoding. The manifest
    is rewritten at the end from the shards on disk, so it is complete after the last rank ends.
    """
    info = tokenizer_info(vq)
    claim_dataset_info(out_dir, info)
    written = skipped = images = 0
    start = time.perf_counter()
    bar = tqdm(desc=f"tokenize -> {out_dir}", unit="img", disable=not progress, dynamic_ncols=True)
    for index, group in _shard_groups(sentences, samples_per_shard):
        path = shard_path(out_dir, index, prefix)
        if index % world_size != rank:
            continue
        if path.exists():
            skipped += 1
            continue
        tokens = encode_sentences(vq, group, batch_size)
        samples = (
            TokenSample(
                key=f"{prefix}-{index * samples_per_shard + i:09d}",
                tokens=t,
                meta={"kind": s.kind, "source": s.source, "task": s.task, **info, "n_images": len(t), **s.meta},
            )
            for i, (s, t) in enumerate(zip(group, tokens, strict=True))
        )
        write_shard(path, samples)
        written += 1
        n = sum(len(t) for t in tokens)
        images += n
        bar.update(n)
        bar.set_postfix(shards=written, skipped=skipped)
    bar.close()
    manifest = write_manifest(out_dir)
    seconds = time.perf_counter() - start
    return {"written": written, "skipped": skipped, "images": images, "seconds": seconds, "manifest": manifest}


def load_tokenizer(name_or_path: str) -> VQGAN:
    """A preset name (random weights; for tests and smoke runs) or a checkpoint directory / file."""
    if Path(name_or_path).exists():
        return VQGAN.from_pretrained(name_or_path)
    return VQGAN.from_name(name_or_path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="source spec, see data.sources.sentences_from_spec")
    parser.add_argument("--out", required=True, help="shard set directory")
    parser.add_argument("--tokenizer", required=True, help="VQGAN checkpoint path or preset name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--count", type=int, default=None, help="at most this many sentences")
    parser.add_argument("--image-size", type=int, default=None, help="procedural image size (default: tokenizer resolution)")
    parser.add_argument("--images-per-sentence", type=int, default=16)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--max-stride", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--prefix", default="shard")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    vq = load_tokenizer(args.tokenizer).to(args.device).eval()
    sentences = sentences_from_spec(
        args.source,
        split=args.split,
        image_size=args.image_size or vq.config.resolution,
        images_per_sentence=args.images_per_sentence,
        count=args.count,
        seed=args.seed,
        stride=args.stride,
        max_stride=args.max_stride,
    )
    result = tokenize_to_shards(
        sentences, vq, args.out, args.samples_per_shard, args.prefix, args.rank, args.world_size, args.batch_size
    )
    print(
        f"wrote {result['written']} shards ({result['images']} images, "
        f"{result['images'] / max(result['seconds'], 1e-9):.1f} images/s), skipped {result['skipped']} finished; "
        f"{args.out} now holds {result['manifest']['samples']} samples"
    )
    return result


if __name__ == "__main__":
    main()
