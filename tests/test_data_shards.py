"""Tokenization into shards with a real (random-init) VQGAN: round trip, resume, ranks, bad shards."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import write_synthetic

from data.procedural import procedural_analogy
from data.shards import (
    ShardStats,
    TokenRangeError,
    claim_dataset_info,
    list_shards,
    read_shard,
)
from data.tokenize import encode_sentences, main, tokenize_to_shards
from tokenizer import VQGAN, to_tensor


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return VQGAN.from_name("vqgan_tiny").eval()


def sentences(n, shots=1):
    return [procedural_analogy(["flip", "edges"][i % 2], i, n_shots=shots, size=32) for i in range(n)]


def all_samples(directory):
    return [s for p in list_shards(directory) for s in read_shard(p, ShardStats())]


@pytest.mark.slow
def test_shards_round_trip_exactly(tmp_path, vq):
    batch = sentences(5)
    result = tokenize_to_shards(batch, vq, tmp_path, samples_per_shard=2, progress=False)
    assert result["written"] == 3 and result["manifest"]["samples"] == 5 and result["manifest"]["images"] == 10
    samples = all_samples(tmp_path)
    expected = vq.encode(to_tensor([im for s in batch for im in s.images], size=32)).numpy()
    stored = np.concatenate([s.tokens for s in samples])
    assert stored.dtype == np.uint16 and stored.shape == (10, 256) and np.array_equal(stored, expected)
    meta = samples[0].meta
    assert {k: meta[k] for k in ("kind", "source", "task", "tokenizer", "codebook_size", "tokens_per_image", "n_images")} == {
        "kind": "analogy", "source": "procedural", "task": "flip", "tokenizer": "vqgan_tiny", "codebook_size": 64,
        "tokens_per_image": 256, "n_images": 2,
    }  # fmt: skip
    # Plain webdataset reads the same samples: the format is standard.
    keys = [s["__key__"] for s in wds.WebDataset([str(p) for p in list_shards(tmp_path)], shardshuffle=False)]
    assert keys == [s.key for s in samples]


@pytest.mark.slow
def test_interrupted_tokenization_resumes_without_duplicates_or_gaps(tmp_path, vq):
    batch = sentences(7)

    def interrupted():
        yield from batch[:5]
        raise KeyboardInterrupt  # killed while encoding shard 2

    with pytest.raises(KeyboardInterrupt):
        tokenize_to_shards(interrupted(), vq, tmp_path / "resumed", samples_per_shard=2, progress=False)
    assert [p.name for p in list_shards(tmp_path / "resumed")] == ["shard-000000.tar", "shard-000001.tar"]
    assert not [p for p in (tmp_path / "resumed").iterdir() if p.name.endswith(".tmp")]  # no half shard
    result = tokenize_to_shards(batch, vq, tmp_path / "resumed", samples_per_shard=2, progress=False)
    assert (result["written"], result["skipped"]) == (2, 2)
    tokenize_to_shards(batch, vq, tmp_path / "straight", samples_per_shard=2, progress=False)
    resumed, straight = all_samples(tmp_path / "resumed"), all_samples(tmp_path / "straight")
    assert [s.key for s in resumed] == [s.key for s in straight] == [f"shard-{i:09d}" for i in range(7)]
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(resumed, straight, strict=True))


def test_ranks_write_disjoint_shards_and_the_cli(tmp_path, vq):
    for rank in range(2):
        argv = ["--source", "procedural:flip", "--count", "5", "--tokenizer", "vqgan_tiny", "--out", str(tmp_path),
                "--samples-per-shard", "2", "--images-per-sentence", "2", "--rank", str(rank), "--world-size", "2"]  # fmt: skip
        result = main(argv)
        assert result["written"] == (2 if rank == 0 else 1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["samples"] == 5 and sorted(manifest["shards"]) == [f"shard-00000{i}.tar" for i in range(3)]
    with pytest.raises(ValueError, match="different tokenizers"):
        tokenize_to_shards(sentences(1), VQGAN.from_name("vqgan_tiny", codebook_size=128), tmp_path, progress=False)


def test_encode_sentences_splits_per_sentence(vq):
    batch = sentences(3, shots=2)
    tokens = encode_sentences(vq, batch, batch_size=3)
    assert [t.shape for t in tokens] == [(4, 256)] * 3


def test_corrupt_member_and_truncated_shard_are_skipped_and_counted(tmp_path):
    write_synthetic(tmp_path / "good.tar", 4)
    # A shard whose second sample has garbage instead of an .npy member.
    with tarfile.open(tmp_path / "bad-member.tar", "w") as tar, tarfile.open(tmp_path / "good.tar") as good:
        for info in good.getmembers():
            data = good.extractfile(info).read()
            if info.name == "s0001.tokens.npy":
                data = b"not a numpy file"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(raw[: len(raw) // 2 + 100])
    stats = ShardStats()
    assert [s.key for s in read_shard(tmp_path / "bad-member.tar", stats)] == ["s0000", "s0002", "s0003"]
    assert 0 < len(list(read_shard(tmp_path / "truncated.tar", stats))) < 4
    assert len(list(read_shard(tmp_path / "good.tar", stats))) == 4
    assert (stats.corrupt_samples, stats.corrupt_shards) == (1, 1)


def test_token_ids_beyond_the_codebook_raise_naming_shard_and_key(tmp_path):
    write_synthetic(tmp_path / "big.tar", 3, codebook_size=1000)
    with pytest.raises(TokenRangeError, match=r"big\.tar sample 's0002'"):
        list(read_shard(tmp_path / "big.tar", ShardStats(), codebook_size=2))


def test_dataset_info_refuses_another_tokenizer(tmp_path):
    info = {"tokenizer": "a", "codebook_size": 8, "tokens_per_image": 4}
    claim_dataset_info(tmp_path, info)
    claim_dataset_info(tmp_path, info)  # same tokenizer: fine
    with pytest.raises(ValueError, match="re-tokenize"):
        claim_dataset_info(tmp_path, {**info, "tokenizer": "b"})
