"""Webdataset tar shards of tokenized sentences: the on-disk format, written atomically, read robustly.

A shard set is a directory:
    dataset.json            the tokenizer the tokens came from: {"tokenizer", "codebook_size", "tokens_per_image"}
    <prefix>-000000.tar     webdataset shards; each sample is two members with the same key:
        <key>.tokens.npy    uint16 [n_images, tokens_per_image]
        <key>.json          {"kind", "source", "task", "tokenizer", "codebook_size", "tokens_per_image",
                             "n_images", ...sentence meta}
    manifest.json           counts per shard and in total (rewritten after each tokenization run)

A shard only ever appears under its final name complete (temp file + rename), so a directory
listing of *.tar is always the list of finished shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from lvm.checkpoints import atomic_path

log = logging.getLogger(__name__)

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FIELDS = ("tokenizer", "codebook_size", "tokens_per_image")


@dataclass
class TokenSample:
    key: str
    tokens: np.ndarray  # uint16 [n_images, tokens_per_image]
    meta: dict


def shard_path(directory: str | os.PathLike, index: int, prefix: str = "shard") -> Path:
    return Path(directory) / f"{prefix}-{index:06d}.tar"


def list_shards(directory: str | os.PathLike) -> list[Path]:
    """Finished shards of a shard set, sorted (temp files of running writers start with '.')."""
    return sorted(p for p in Path(directory).glob("*.tar") if not p.name.startswith("."))


def write_shard(path: str | os.PathLike, samples: Iterable[TokenSample]) -> int:
    """Write samples as one webdataset tar, atomically; returns the number of samples."""
    count = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream, wds.TarWriter(stream) as writer:
            for sample in samples:
                if sample.tokens.dtype != np.uint16 or sample.tokens.ndim != 2:
                    raise ValueError(f"sample {sample.key}: tokens must be uint16 [n_images, tokens_per_image]")
                writer.write({"__key__": sample.key, "tokens.npy": sample.tokens, "json": sample.meta})
                count += 1
    return count


def read_dataset_info(directory: str | os.PathLike) -> dict:
    """The tokenizer identity of a shard set (dataset.json)."""
    path = Path(directory) / DATASET_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: {directory} is not a shard set. Create one with `python -m data.tokenize`."
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-create it with `python -m data.tokenize`") from error
    expected = {"tokenizer": str, "codebook_size": int, "tokens_per_image": int}
    found = info if isinstance(info, dict) else {}
    wrong = [f"{k} must be {t.__name__}, found {found.get(k)!r}" for k, t in expected.items() if type(found.get(k)) is not t]
    if wrong:
        raise ValueError(f"{path}: {'; '.join(wrong)}. Re-create it with `python -m data.tokenize`.")
    return info


def claim_dataset_info(directory: str | os.PathLike, info: dict) -> None:
    """Record the tokenizer of a new shard set, or check that an existing one used the same tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / DATASET_FILE
    if path.exists():
        check_same_tokenizer({str(directory): read_dataset_info(directory), "this run": info})
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({k: info[k] for k in TOKENIZER_FIELDS}, indent=2))


def check_same_tokenizer(infos: dict[str, dict]) -> dict:
    """Raise if shard sets (name -> dataset info) were made with different tokenizers; return the common one."""
    identities = {name: tuple(info[k] for k in TOKENIZER_FIELDS) for name, info in infos.items()}
    if len(set(identities.values())) > 1:
        listing = "; ".join(f"{name}: {dict(zip(TOKENIZER_FIELDS, ident, strict=True))}" for name, ident in identities.items())
        raise ValueError(
            f"shard sets come from different tokenizers ({listing}). Their token ids mean different things: "
            "re-tokenize them with one tokenizer, or write into a new directory."
        )
    return dict(zip(TOKENIZER_FIELDS, next(iter(identities.values())), strict=True))


def write_manifest(directory: str | os.PathLike) -> dict:
    """Count samples, images and tokens of every finished shard into manifest.json; returns it."""
    directory = Path(directory)
    shards, stats = {}, ShardStats()
    for path in list_shards(directory):
        samples = list(read_shard(path, stats))
        shards[path.name] = {
            "samples": len(samples),
            "images": sum(s.tokens.shape[0] for s in samples),
            "tokens": sum(s.tokens.size for s in samples),
        }
    manifest = {
        **read_dataset_info(directory),
        "shards": shards,
        **{k: sum(s[k] for s in shards.values()) for k in ("samples", "images", "tokens")},
        "corrupt_shards": stats.corrupt_shards,
        "corrupt_samples": stats.corrupt_samples,
    }
    with atomic_path(directory / MANIFEST_FILE) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass
class ShardStats:
    """What reading skipped: whole shards that could not be read to the end, and single bad samples."""

    corrupt_shards: int = 0
    corrupt_samples: int = 0


def _decode(key: str, members: dict[str, bytes], path: Path, codebook_size: int | None) -> TokenSample:
    tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
    meta = json.loads(members["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"the json member must be an object, found {type(meta).__name__}")
    if tokens.dtype != np.uint16 or tokens.ndim != 2:
        raise ValueError(f"tokens must be uint16 [n_images, tokens_per_image], got {tokens.dtype} {tokens.shape}")
    limit = codebook_size if codebook_size is not None else meta["codebook_size"]
    if tokens.size and int(tokens.max()) >= limit:
        # Not a corruption to skip: the shard does not belong to this tokenizer, training would be wrong.
        raise TokenRangeError(
            f"shard {path} sample {key!r}: token id {int(tokens.max())} >= codebook size {limit}. The shard was "
            "made with a different tokenizer than its dataset.json says; re-tokenize it."
        )
    return TokenSample(key, tokens, meta)


class TokenRangeError(ValueError):
    """Token ids outside the codebook: raised, never skipped."""


def read_shard(path: str | os.PathLike, stats: ShardStats, codebook_size: int | None = None) -> Iterator[TokenSample]:
    """Samples of one shard in order. A sample that fails to decode is skipped and counted; a shard
    that is truncated or not a tar ends early and is counted. Both are logged, training goes on."""
    path = Path(path)
    for key, members in iter_tar_groups(path):
        if members is None:  # `key` is the error
            stats.corrupt_shards += 1
            log.warning("shard %s is truncated or corrupt (%s); skipping the rest of it", path, key)
            return
        yield from _finish(key, members, path, stats, codebook_size)


def iter_tar_groups(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """(key, {extension: bytes}) per sample of a webdataset tar, in order (members `key.ext`, the extension
    being everything after the first dot). A tar that cannot be read to its end yields (error text, None) last."""
    key, members = None, {}
    try:
        with open(path, "rb") as file:
            with tarfile.open(fileobj=file, mode="r|") as tar:  # one streaming pass, as a remote read would be
                for info in tar:
                    if not info.isfile():
                        continue
                    member_key, _, extension = info.name.rsplit("/", 1)[-1].partition(".")
                    if member_key != key and key is not None:
                        yield key, members
                        members = {}
                    key = member_key
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise EOFError(f"member {info.name} cut short")
                    members[extension] = data
                end = tar.offset
            # tarfile ends quietly at a cut header; a complete archive ends with two zero blocks
            file.seek(end)
            tail = file.read()
            if len(tail) < 1024 or tail.strip(b"\0"):
                raise EOFError("no end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError) as error:
        yield f"{type(error).__name__}: {error}", None
        return
    if key is not None:
        yield key, members


def _finish(key, members, path, stats, codebook_size) -> Iterator[TokenSample]:
    try:
        sample = _decode(key, members, path, codebook_size)
    except TokenRangeError:
        raise
    except (KeyError, ValueError, EOFError, OSError) as error:  # missing member, bad npy or json
        stats.corrupt_samples += 1
        log.warning("shard %s sample %r is corrupt (%s: %s); skipped", path, key, type(error).__name__, error)
        return
    yield sample
