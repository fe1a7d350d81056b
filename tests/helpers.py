"""Helpers shared by several test modules (test modules never import one another)."""

from pathlib import Path

import numpy as np

from data.shards import TokenSample, write_shard
from vlm import VLM, VLMConfig
from vlm.text import train_default_tokenizer

# A tiny CLIP (32 px, patch 8) -> VILA downsample -> 2-layer LVM text decoder; the vocabulary and image id
# come from the tokenizer the training module is given.
TINY_VLM_SPEC = {
    "encoder": {"kind": "hf", "feature_layer": -1, "config": dict(
        model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2)},
    "connector": "downsample_mlp",
    "llm": {"kind": "lvm", "config": dict(name="t", vocab_size=0, codebook_size=0, hidden_size=48, intermediate_size=96,
                                          num_layers=2, num_heads=4, max_position_embeddings=256)},
    "image_token_id": 0,
}  # fmt: skip


def write_synthetic(path, n, codebook_size=64, images=1, first=0):
    """A shard of n samples whose tokens all equal the sample number (first, first + 1, ..)."""
    meta = {"codebook_size": codebook_size, "tokens_per_image": 4, "n_images": images}
    write_shard(path, [TokenSample(f"s{i:04d}", np.full((images, 4), i, np.uint16), meta) for i in range(first, first + n)])


def save_tiny_vlm(directory: Path) -> None:
    """A random VLM (32 px CLIP encoder, 2-layer LVM text decoder) with a small BPE tokenizer beside it."""
    texts = [
        "a red circle on a white background",
        "What colour is the square? blue",
        "How many shapes? three",
    ]
    tokenizer = train_default_tokenizer(directory, texts=texts * 4, vocab_size=300)
    encoder = dict(
        model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4,
    )  # fmt: skip
    llm = dict(
        name="text", vocab_size=len(tokenizer), codebook_size=0, hidden_size=48, intermediate_size=96,
        num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    config = VLMConfig(
        encoder={"kind": "hf", "config": encoder}, llm={"kind": "lvm", "config": llm},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    VLM(config).save_pretrained(directory)
