"""VLM training batches from the shards `python -m vlm.prepare` writes: `VLMStream` and `VLMDataModule`.

The LVM's stream machinery serves unchanged (data.datamodule: shards split by rank and worker, weighted
mixing of sources, a shuffle buffer, resume mid-epoch by fast-forwarding each worker); what differs is
what a sample is, overridden here:
    read     a shard -> (sample json, PIL images)            vlm.prepare.iter_shard_samples
    pack     turns -> ids and labels (loss on answers only)   vlm.text.encode_turns
             images -> tiles + token counts                   vlm.processing.ImageProcessor
             each <image> expanded to its count, labels -100 there, then one document of a packed row
             (data.packing.Packer; a document and its images always stay in one row)
    collate  rows -> input_ids, labels, document_ids, position_ids [B, L] (block-diagonal attention,
             positions restarting per sample, as the LVM trains), pixel_values [n_tiles, 3, S, S] in
             reading order, source_ids [B, L] (the sample's source, for the loss per source)
The image processor comes from the model (`VLMModule.setup` calls `set_processor`): tile size,
normalisation and tokens per tile are the encoder's and the connector's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from data.datamodule import TokenDataModule, TokenStream
from data.packing import IGNORE_INDEX, PAD_DOCUMENT, Packer, collate_rows
from data.shards import ShardStats

log = logging.getLogger(__name__)


def expand_with_labels(ids: list[int], labels: list[int], image_id: int, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each `<image>` id becomes counts[i] copies (vlm.splice.expand_placeholders), labels IGNORE_INDEX there."""
    from vlm.splice import expand_placeholders

    expanded = np.asarray(expand_placeholders(ids, image_id, counts), np.int64)  # checks the counts
    repeats = np.ones(len(ids), np.int64)
    repeats[np.asarray(ids) == image_id] = counts
    expanded_labels = np.repeat(np.asarray(labels, np.int64), repeats)
    expanded_labels[expanded == image_id] = IGNORE_INDEX
    return expanded, expanded_labels


def sample_document(tokenizer, processor, sample: dict, images: list) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """A shard sample and its PIL images -> (ids [L], labels [L], pixel tiles [n_tiles, 3, S, S]): turns
    tokenized with answer-only labels (vlm.text.encode_turns), each `<image>` expanded to its image's token
    count. What training sees of a sample, and what vlm.filter scores."""
    from vlm.text import IMAGE_TOKEN, encode_turns

    ids, labels = encode_turns(tokenizer, sample["turns"])
    processed = processor(images)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, labels = expand_with_labels(ids, labels, image_id, processed.tokens_per_image)
    labels[0] = IGNORE_INDEX  # nothing before a document predicts its first token
    return ids, labels, processed.pixel_values


class VLMStream(TokenStream):
    """Packed VLM batches; see the module docstring. `sources`: source names, whose index is a source id."""

    def __init__(self, sets, seq_len: int, batch_size: int, tokenizer_path: str, processor, sources: Sequence[str],
                 pack: bool = True, **options):
        from vlm.text import load_text_tokenizer

        tokenizer = load_text_tokenizer(tokenizer_path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        super().__init__(sets, seq_len, batch_size, bos_id=-1, eos_id=self.pad_id, codebook_size=0,
                         cross_rows=False, **options)
        self.tokenizer_path, self.processor, self.sources, self.pack_rows = tokenizer_path, processor, list(sources), pack
        self._tokenizer = None  # loaded in each worker: tokenizers do not pickle cheaply

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from vlm.text import load_text_tokenizer

            self._tokenizer = load_text_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def read(self, shard: Path, stats: ShardStats) -> Iterator:
        from vlm.prepare import iter_shard_samples

        yield from iter_shard_samples(shard)

    def new_packer(self) -> Packer:
        return Packer(self.seq_len, self.bos_id, self.eos_id, cross_rows=False)

    def pack(self, packer: Packer, sample) -> Iterator:
        sample, images = sample
        yield from self.add(packer, sample, self.document(sample, images))

    def add(self, packer: Packer, sample: dict, document, **payload) -> Iterator:
        """Add one document (ids, labels, pixel tiles) of `sample` (None: skipped) with its images and source,
        and any further `payload` fields; yields the rows it completes."""
        if document is None:
            return
        ids, labels, pixels = document
        source = self.sources.index(sample["source"]) if sample.get("source") in self.sources else -1
        yield from packer.add_document(ids, labels, payload={"pixels": pixels, "source": source, **payload})
        if not self.pack_rows:  # one sample per row (transformers LLMs take no block-diagonal mask)
            yield from packer.flush()

    def document(self, sample: dict, images: list) -> tuple[np.ndarray, np.ndarray, torch.Tensor] | None:
        """One sample -> (ids, labels, pixel tiles), or None (counted and logged) when it cannot fit a row."""
        ids, labels, pixels = sample_document(self.tokenizer, self.processor, sample, images)
        if len(ids) > self.seq_len:
            log.warning("sample %s: %d tokens with its images, more than seq_len %d: skipped",
                        sample.get("id"), len(ids), self.seq_len)
            return None
        return ids, labels, pixels

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        batch = collate_rows(rows)
        payloads = [p for row in rows for p in row.payloads]
        size = self.processor.tile_size
        batch["pixel_values"] = torch.cat([p["pixels"] for p in payloads]) if payloads else torch.zeros(0, 3, size, size)
        batch["source_ids"] = document_field(rows, batch, "source")
        return batch


def document_field(rows: list, batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """long [B, L]: each token's document's payload[key] (an int), -1 on padding."""
    values = torch.full_like(batch["input_ids"], -1)
    for b, row in enumerate(rows):
        for doc, payload in enumerate(row.payloads):
            values[b][batch["document_ids"][b] == doc] = payload[key]
    return values.masked_fill(batch["document_ids"] == PAD_DOCUMENT, -1)


class VLMDataModule(TokenDataModule):
    """VLM batches from shard sets of `python -m vlm.prepare`, resumable mid-epoch like TokenDataModule.

    train / val / val_fraction / seq_len / batch_size / num_workers / seed / shuffle_buffer: as there
    (train may be {directory: weight} to mix sources). tokenizer: a local HF tokenizer directory with
    `<image>` and a chat template (vlm.text). tiling / max_tiles: the image processor's (none, internvl,
    anyres, catty). pack: several samples per row with block-diagonal attention (our LLM); False gives
    one sample per row (needed by transformers LLMs).
    """

    def __init__(
        self,
        train: str | Sequence[str] | Mapping[str, float],
        tokenizer: str,
        val: str | Sequence[str] | None = None,
        val_fraction: float = 0.0,
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 256,
        tiling: str = "none",
        max_tiles: int = 6,
        pack: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.tokenizer, self.tiling, self.max_tiles, self.pack = tokenizer, tiling, max_tiles, pack
        self.processor = None
        super().__init__(train, val=val, val_fraction=val_fraction, seq_len=seq_len, batch_size=batch_size,
                         num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer, cross_rows=False,
                         rank=rank, world_size=world_size)

    def check_sources(self) -> None:
        """Before any compute: the tokenizer serves a VLM, and every shard set has a manifest."""
        from vlm.prepare import read_manifest
        from vlm.text import check_tokenizer, load_text_tokenizer

        self.image_token_id = check_tokenizer(load_text_tokenizer(self.tokenizer, check=False))
        self.sources: list[str] = []
        for directory in [*self.train_weights, *self.val_dirs]:
            for source in read_manifest(directory)["per_source"]:  # raises, naming the fix, without one
                if source not in self.sources:
                    self.sources.append(source)

    def set_processor(self, processor) -> None:
        """The model's image processor (VLMModule.setup): its tile size and tokens per tile."""
        self.processor = processor

    def _stream(self, sets, train: bool) -> VLMStream:
        if self.processor is None:
            raise RuntimeError("VLMDataModule has no image processor: VLMModule.setup sets it (or call set_processor)")
        return VLMStream(
            sets, self.seq_len, self.batch_size, self.tokenizer, self.processor, self.sources, pack=self.pack,
            seed=self.seed, shuffle=train, shuffle_buffer=self.shuffle_buffer, rank=self.rank,
            world_size=self.world_size, tag=train,
        )  # fmt: skip
