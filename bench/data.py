"""Data-stage throughput: packed tokens/s streamed from shards (one worker) and tokenization images/s.

    python bench/data.py [--samples 2000] [--tokenizer vqgan_demo] [--images 256]

Streaming reads real shards of paper-shaped sentences (16 images x 256 tokens, 8192 codes) and packs
them into 4096-token rows in one process, the work one DataLoader worker does; the goal is at least
5M tokens/s, far above what one GPU trains on. Tokenization runs procedural analogies through
`tokenize_to_shards` with the given VQGAN preset (random weights: the speed does not depend on them).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.datamodule import ShardSet, TokenStream  # noqa: E402
from data.packing import special_tokens  # noqa: E402
from data.procedural import TASKS, procedural_analogy  # noqa: E402
from data.shards import TokenSample, list_shards, write_shard  # noqa: E402
from data.tokenize import tokenize_to_shards  # noqa: E402
from tokenizer import VQGAN  # noqa: E402


def packed_tokens_per_s(directory: Path, samples: int, per_shard: int = 250, seq_len: int = 4096) -> float:
    rng = np.random.default_rng(0)
    meta = {"kind": "sequence", "codebook_size": 8192, "tokens_per_image": 256, "n_images": 16}
    for shard in range(samples // per_shard):
        tokens = rng.integers(0, 8192, size=(per_shard, 16, 256), dtype=np.uint16)
        write_shard(directory / f"shard-{shard:06d}.tar", (TokenSample(f"{shard}-{i}", t, meta) for i, t in enumerate(tokens)))
    bos, eos = special_tokens(8192)
    stream = TokenStream([ShardSet(list_shards(directory))], seq_len, 8, bos, eos, 8192, shuffle_buffer=1000)
    start, tokens = time.perf_counter(), 0
    for batch in stream:
        tokens += int((batch["labels"] != -100).sum())
    return tokens / (time.perf_counter() - start)


def tokenize_images_per_s(directory: Path, preset: str, images: int) -> float:
    vq = VQGAN.from_name(preset).eval()
    size = vq.config.resolution
    sentences = [procedural_analogy(TASKS[i % len(TASKS)], i, n_shots=8, size=size) for i in range(images // 16)]
    result = tokenize_to_shards(sentences, vq, directory, samples_per_shard=8, progress=False)
    return result["images"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="sentences of 4096 tokens to stream")
    parser.add_argument("--tokenizer", default="vqgan_demo", help="VQGAN preset for the tokenization timing")
    parser.add_argument("--images", type=int, default=256, help="images to tokenize")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "stream").mkdir()
        packed = packed_tokens_per_s(Path(tmp) / "stream", args.samples)
        tokenized = tokenize_images_per_s(Path(tmp) / "tokenize", args.tokenizer, args.images)
    print(f"packed tokens/s (one worker): {packed / 1e6:.1f}M (goal >= 5M)")
    print(f"tokenization with {args.tokenizer}: {tokenized:.1f} images/s ({'cuda' if torch.cuda.is_available() else 'cpu'})")
    print(json.dumps({"bench": "data", "packed_tokens_per_s": round(packed), "tokenize_images_per_s": round(tokenized, 1)}))


if __name__ == "__main__":
    main()
