"""Helpers shared by several test modules (test modules never import one another)."""

import numpy as np

from data.shards import TokenSample, write_shard


def write_synthetic(path, n, codebook_size=64, images=1, first=0):
    """A shard of n samples whose tokens all equal the sample number (first, first + 1, ..)."""
    meta = {"codebook_size": codebook_size, "tokens_per_image": 4, "n_images": images}
    write_shard(path, [TokenSample(f"s{i:04d}", np.full((images, 4), i, np.uint16), meta) for i in range(first, first + n)])
