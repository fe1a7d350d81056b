"""Visual sentences: sources, tokenization to webdataset shards, packed streaming for training."""

import importlib

from data.packing import Packer, collate_rows, cu_seqlens, special_tokens
from data.procedural import TASKS, moving_shapes, procedural_analogy, procedural_seeds
from data.sentences import KINDS, Sentence
from data.shards import TokenSample, list_shards, read_shard, write_shard
from data.sources import sentences_from_spec
from data.tokenize import encode_sentences, tokenize_to_shards

# Loaded on first use: data.datamodule imports Lightning, which costs seconds and is not needed to
# build, tokenize or read sentences (PEP 562 module __getattr__).
_LAZY = {"ShardSet": "data.datamodule", "TokenDataModule": "data.datamodule", "TokenStream": "data.datamodule"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")


__all__ = [
    "KINDS", "TASKS", "Packer", "Sentence", "ShardSet", "TokenDataModule", "TokenSample", "TokenStream",
    "collate_rows", "cu_seqlens", "encode_sentences", "list_shards", "moving_shapes", "procedural_analogy",
    "procedural_seeds", "read_shard", "sentences_from_spec", "special_tokens", "tokenize_to_shards", "write_shard",
]  # fmt: skip
