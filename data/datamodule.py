"""Streaming packed token rows from shard sets: `TokenStream` (an IterableDataset) and `TokenDataModule`.

Per epoch, each (rank, worker) pair of the G = world_size x num_workers readers:
  1. shuffles every shard set's shard list with the same seed (seed, epoch, set, pass) on all
     readers, then takes every G-th shard starting at its global index (split_by_node then
     split_by_worker): readers never share a shard, and together they read every shard once;
  2. repeats a shard set `weight` times per epoch (a fractional part keeps that share of its
     samples), so rare tasks can be up-weighted as DeLVM rebalances them, and interleaves the sets
     at random in proportion to their weights;
  3. shuffles samples through a buffer, packs them into rows (data.packing) and yields whole
     batches, tagged with (worker, batch index) so the main process knows what was consumed.
Everything is seeded by (seed, epoch, reader), so a stream is a pure function of its state.
Resuming fast-forwards each worker past the batches the checkpoint says it consumed: correct and
simple, at the cost of re-reading those samples once.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.packing import Packer, collate_rows, special_tokens
from data.shards import ShardStats, check_same_tokenizer, list_shards, read_dataset_info, read_shard

log = logging.getLogger(__name__)

STREAM_STATE = "stream_state"  # batch key of the tag; TokenDataModule removes it before the model sees the batch
_TAG_FIELDS = ("role", "batch", "corrupt_shards", "corrupt_samples", "split_sentences", "dropped_sentences")


@dataclass
class ShardSet:
    shards: list[Path]
    weight: float = 1.0
    name: str = ""


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else the given values (default 0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return rank or 0, world_size or 1


class TokenStream(IterableDataset):
    """Batches of packed rows (see data.packing for the layout) from weighted shard sets.

    Worker roles: the DataLoader hands batch requests to its workers in turn, starting with worker
    0. To resume in the same order, loader worker i plays role (i + first_role) % num_workers; a
    role is what decides the shards and seeds. `skip` maps role -> batches it already delivered.
    """

    def __init__(
        self,
        sets: Sequence[ShardSet],
        seq_len: int,
        batch_size: int,
        bos_id: int,
        eos_id: int,
        codebook_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        cross_rows: bool = True,
        long_sentences: str = "split",
        rank: int | None = None,
        world_size: int | None = None,
        tag: bool = True,
    ):
        self.sets, self.seq_len, self.batch_size = list(sets), seq_len, batch_size
        self.bos_id, self.eos_id, self.codebook_size = bos_id, eos_id, codebook_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.cross_rows, self.long_sentences, self.tag = cross_rows, long_sentences, tag
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip: dict[int, int] = {}
        self.first_role = 0

    def reader(self) -> tuple[int, int, int]:
        """(worker role, this reader's global index, number of readers)."""
        rank, world_size = resolve_rank(self.rank, self.world_size)
        info = get_worker_info()
        workers = info.num_workers if info else 1
        role = ((info.id if info else 0) + self.first_role) % workers
        return role, rank * workers + role, world_size * workers

    def _set_samples(self, index: int, shard_set: ShardSet, reader: int, readers: int, stats: ShardStats):
        passes = math.ceil(shard_set.weight)
        for repeat in range(passes):
            shards = list(shard_set.shards)
            if self.shuffle:
                _rng(self.seed, self.epoch, index, repeat).shuffle(shards)
            keep = shard_set.weight - repeat if repeat == passes - 1 else 1.0
            thin = _rng(self.seed, self.epoch, index, repeat, reader, 1)
            for shard in shards[reader::readers]:
                for sample in self.read(shard, stats):
                    if keep >= 1.0 or thin.random() < keep:
                        yield sample

    # -- what a sample is: token sentences here; vlm.data.VLMStream reads conversations with images ------
    def read(self, shard: Path, stats: ShardStats) -> Iterator:
        """The samples of one shard (corrupt ones counted in `stats` and skipped)."""
        for sample in read_shard(shard, stats, self.codebook_size):
            yield sample.tokens

    def new_packer(self) -> Packer:
        return Packer(self.seq_len, self.bos_id, self.eos_id, self.cross_rows, self.long_sentences)

    def pack(self, packer: Packer, sample) -> Iterator:
        """The rows one sample completes."""
        return packer.add(sample)

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        return collate_rows(rows)

    def _mixed(self, reader: int, readers: int, stats: ShardStats) -> Iterator:
        """Samples of all sets, interleaved at random in proportion to the set weights."""
        streams = [self._set_samples(i, s, reader, readers, stats) for i, s in enumerate(self.sets)]
        weights = [s.weight for s in self.sets]
        rng = _rng(self.seed, self.epoch, reader, 2)
        while streams:
            p = np.asarray(weights) / sum(weights)
            choice = int(rng.choice(len(streams), p=p)) if len(streams) > 1 else 0
            try:
                yield next(streams[choice])
            except StopIteration:
                del streams[choice], weights[choice]

    def _shuffled(self, samples: Iterator, reader: int) -> Iterator:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        rng, buffer = _rng(self.seed, self.epoch, reader, 3), []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            yield buffer[i]
            buffer[i] = sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        role, reader, readers = self.reader()
        shard_stats = ShardStats()
        packer = self.new_packer()
        skip = self.skip.get(role, 0)
        rows, batch_index = [], 0

        def batch() -> dict[str, torch.Tensor]:
            out = self.collate(rows)
            if self.tag:
                values = (role, batch_index, *asdict(shard_stats).values(), packer.stats.split_sentences,
                          packer.stats.dropped_sentences)  # fmt: skip
                out[STREAM_STATE] = torch.tensor(values, dtype=torch.long)
            return out

        for sample in self._shuffled(self._mixed(reader, readers, shard_stats), reader):
            for row in self.pack(packer, sample):
                rows.append(row)
                if len(rows) == self.batch_size:
                    if batch_index >= skip:
                        yield batch()
                    rows, batch_index = [], batch_index + 1
        rows.extend(packer.flush())
        if rows and batch_index >= skip:
            yield batch()


class TokenDataModule(L.LightningDataModule):
    """Packed token batches from one or more shard sets, resumable mid-epoch through Lightning checkpoints.

    train: a shard set directory, a list of them, or {directory: weight} (weight = passes per epoch).
    val: directories for validation; or `val_fraction` of the train shards (chosen by a hash of their
    names, so the choice is stable) are held out from training instead.
    Token ids: BOS/EOS default to codebook_size / codebook_size + 1 of the sets' tokenizer.
    Batches: {"input_ids", "labels", "document_ids", "position_ids"} of shape [batch_size, seq_len].

    Resume bookkeeping happens in this module's `on_before_batch_transfer` (Lightning then ignores a
    LightningModule's own hook of that name). Workers are not persistent, and under DDP the ranks
    may yield different numbers of batches at the end of an epoch: cap them with limit_train_batches.
    """

    def __init__(
        self,
        train: str | Sequence[str] | Mapping[str, float],
        val: str | Sequence[str] | None = None,
        val_fraction: float = 0.0,
        seq_len: int = 4096,
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        cross_rows: bool = True,
        long_sentences: str = "split",
        bos_id: int | None = None,
        eos_id: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.train_weights = {train: 1.0} if isinstance(train, str) else dict(train) if isinstance(train, Mapping) else dict.fromkeys(train, 1.0)
        self.val_dirs = [val] if isinstance(val, str) else list(val or [])
        self.val_fraction, self.seq_len, self.batch_size, self.num_workers = val_fraction, seq_len, batch_size, num_workers
        self.seed, self.shuffle_buffer, self.cross_rows, self.long_sentences = seed, shuffle_buffer, cross_rows, long_sentences
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.bos_id, self.eos_id = bos_id, eos_id
        self.check_sources()
        self._epoch = 0
        self._consumed: dict[int, int] = {}  # worker role -> batches consumed this epoch
        self._next_role = 0  # the role whose batch comes next (see TokenStream)
        self._worker_stats: dict[int, list[int]] = {}
        self._resume: dict | None = None

    def check_sources(self) -> None:
        """Before any compute: every shard set was written by the same image tokenizer; BOS/EOS follow it."""
        infos = {d: read_dataset_info(d) for d in [*self.train_weights, *self.val_dirs]}
        self.tokenizer_info = check_same_tokenizer(infos)
        bos, eos = special_tokens(self.tokenizer_info["codebook_size"])
        self.bos_id = bos if self.bos_id is None else self.bos_id
        self.eos_id = eos if self.eos_id is None else self.eos_id

    # -- shard selection ---------------------------------------------------------------------------
    def _is_val_shard(self, path: Path) -> bool:
        return zlib.crc32(path.name.encode()) / 2**32 < self.val_fraction

    def train_sets(self) -> list[ShardSet]:
        sets = []
        for directory, weight in self.train_weights.items():
            shards = [p for p in list_shards(directory) if not self._is_val_shard(p)]
            if not shards:
                raise ValueError(f"no training shards in {directory} (val_fraction={self.val_fraction} holds out all)")
            sets.append(ShardSet(shards, weight, directory))
        return sets

    def val_sets(self) -> list[ShardSet]:
        if self.val_dirs:
            return [ShardSet(list_shards(d), 1.0, d) for d in self.val_dirs]
        held_out = [p for d in self.train_weights for p in list_shards(d) if self._is_val_shard(p)]
        return [ShardSet(held_out, 1.0, "held-out train shards")] if held_out else []

    def _stream(self, sets: list[ShardSet], train: bool) -> TokenStream:
        return TokenStream(
            sets, self.seq_len, self.batch_size, self.bos_id, self.eos_id, self.tokenizer_info["codebook_size"],
            seed=self.seed, shuffle=train, shuffle_buffer=self.shuffle_buffer, cross_rows=self.cross_rows,
            long_sentences=self.long_sentences, rank=self.rank, world_size=self.world_size, tag=train,
        )  # fmt: skip

    # -- loaders -----------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return _EpochLoader(self, self._stream(self.train_sets(), train=True), self._loader_options())

    def val_dataloader(self) -> DataLoader | list:
        sets = self.val_sets()
        return DataLoader(self._stream(sets, train=False), batch_size=None, **self._loader_options()) if sets else []

    def _loader_options(self) -> dict:
        # Workers must not persist: each epoch's stream settings (epoch, resume skip) reach them by pickling.
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory, "persistent_workers": False}

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next train iteration when no Trainer drives this module."""
        self._epoch = epoch

    def _start_epoch(self, stream: TokenStream) -> None:
        """Called as a train iteration starts: picks the epoch and, once after a restore, the resume point."""
        epoch = self.trainer.current_epoch if self.trainer is not None else self._epoch
        stream.epoch, stream.skip, stream.first_role = epoch, {}, 0
        self._epoch, self._consumed, self._worker_stats, self._next_role = epoch, {}, {}, 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            stream.skip, stream.first_role = dict(self._resume["consumed"]), self._resume["next_role"]
            self._consumed, self._next_role = dict(stream.skip), stream.first_role
        self._resume = None

    # -- consumption tracking and checkpoint state -------------------------------------------------
    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Record which worker's batch the loop is about to train on, and drop the tag."""
        tag = batch.pop(STREAM_STATE, None)
        if tag is not None:
            role, index, *stats = tag.tolist()
            self._consumed[role] = index + 1
            self._worker_stats[role] = stats
            self._next_role = (role + 1) % max(self.num_workers, 1)
        return batch

    @property
    def skipped(self) -> dict[str, int]:
        """Bad input seen by the consumed batches, summed over workers: corrupt shards and samples,
        sentences split or dropped for being longer than a row."""
        totals = np.sum(list(self._worker_stats.values()) or [[0] * 4], axis=0)
        return dict(zip(_TAG_FIELDS[2:], (int(t) for t in totals), strict=True))

    def state_dict(self) -> dict:
        rank, world_size = resolve_rank(self.rank, self.world_size)
        position = {"consumed": dict(self._consumed), "next_role": self._next_role}
        if dist.is_available() and dist.is_initialized():  # every rank's workers are at their own place
            gathered = [None] * world_size
            dist.all_gather_object(gathered, position)
        else:
            gathered = [position]
        return {"epoch": self._epoch, "position_by_rank": gathered, "num_workers": self.num_workers,
                "world_size": world_size, "seed": self.seed}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        rank, world_size = resolve_rank(self.rank, self.world_size)
        expected = {"num_workers": self.num_workers, "world_size": world_size, "seed": self.seed}
        found = {k: state[k] for k in expected}
        if found != expected:
            raise ValueError(
                f"cannot resume the data stream mid-epoch: the checkpoint was written with {found}, this run has "
                f"{expected}. Use the same values, or drop the datamodule state to restart the epoch."
            )
        position = state["position_by_rank"][rank if len(state["position_by_rank"]) > 1 else 0]
        consumed = {int(k): v for k, v in position["consumed"].items()}
        self._resume = {"epoch": state["epoch"], "consumed": consumed, "next_role": position["next_role"]}
        self._epoch = state["epoch"]


class _EpochLoader(DataLoader):
    """A DataLoader that tells its TokenDataModule each time a new pass over the stream begins."""

    def __init__(self, module: TokenDataModule, stream: TokenStream, options: dict):
        super().__init__(stream, batch_size=None, **options)
        self._module = module

    def __iter__(self):
        self._module._start_epoch(self.dataset)
        return super().__iter__()
