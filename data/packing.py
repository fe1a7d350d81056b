"""Packing token sentences into fixed-length rows `[BOS] img .. img [EOS] [BOS] img ..`.

Each sentence becomes one document: BOS, its images' tokens row-major, EOS. A row carries
    input_ids     long [L]
    labels        long [L]   = input_ids, -100 on padding (the model shifts internally, HF style)
    document_ids  int  [L]   0, 1, 2.. per document within the row; -1 on padding
    position_ids  long [L]   restarting at 0 at each document's BOS
so attention can be block-diagonal-causal (`cu_seqlens` turns document ids into flash-attn form).

Two ways to fill rows:
    cross_rows=True   documents are concatenated into one stream and cut into rows at any token
                      (LLM-style); a document cut at a row end continues in the next row, its
                      position ids continuing. Every row but the stream's last is 100% full.
    cross_rows=False  documents are never cut: one that does not fit the rest of the row starts a
                      new row and the rest is padded. Fill then depends on sentence lengths.
A sentence longer than a row (more than seq_len tokens with BOS/EOS) is split at image boundaries
into documents that fit, or dropped (`long_sentences`); either way it is counted, never cut
mid-image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE_INDEX = -100
PAD_DOCUMENT = -1


def special_tokens(codebook_size: int) -> tuple[int, int]:
    """(BOS, EOS) ids: the first ids after the image codes (8192, 8193 for an 8192-code book)."""
    return codebook_size, codebook_size + 1


@dataclass
class PackStats:
    split_sentences: int = 0  # longer than a row, split at image boundaries
    dropped_sentences: int = 0  # longer than a row, dropped (or a single image longer than a row)
    documents: int = 0
    rows: int = 0


@dataclass
class Row:
    input_ids: np.ndarray  # int64 [L]
    document_ids: np.ndarray  # int32 [L]
    position_ids: np.ndarray  # int64 [L]
    length: int  # tokens before padding
    labels: np.ndarray  # int64 [L]: the documents' labels (their ids unless given), IGNORE_INDEX on padding
    payloads: list = field(default_factory=list)  # per document of the row, in order (e.g. a VLM's images)


@dataclass
class Packer:
    """Turns token sentences (uint16 [n_images, tokens_per_image]) into complete rows, in order."""

    seq_len: int
    bos_id: int
    eos_id: int
    cross_rows: bool = True
    long_sentences: str = "split"  # or "drop"
    stats: PackStats = field(default_factory=PackStats)

    def __post_init__(self):
        if self.long_sentences not in ("split", "drop"):
            raise ValueError(f"long_sentences must be 'split' or 'drop', got {self.long_sentences!r}")
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._payloads: list = []
        self._docs: list[np.ndarray] = []
        self._pos: list[np.ndarray] = []
        self._filled = 0
        self._doc_in_row = 0

    def documents(self, tokens: np.ndarray) -> list[np.ndarray]:
        """A sentence -> its documents (int64 [BOS, tokens.., EOS]), split or dropped when too long."""
        n_images, per_image = tokens.shape
        if n_images * per_image + 2 <= self.seq_len:
            pieces = [tokens]
        else:
            fit = (self.seq_len - 2) // per_image
            if self.long_sentences == "drop" or fit == 0:
                self.stats.dropped_sentences += 1
                return []
            self.stats.split_sentences += 1
            pieces = [tokens[i : i + fit] for i in range(0, n_images, fit)]
        return [np.concatenate(([self.bos_id], piece.reshape(-1).astype(np.int64), [self.eos_id])) for piece in pieces]

    def add(self, tokens: np.ndarray) -> Iterator[Row]:
        """Add one sentence; yields the rows it completes."""
        for document in self.documents(tokens):
            yield from self.add_document(document)

    def add_document(self, document: np.ndarray, labels: np.ndarray | None = None, payload=None) -> Iterator[Row]:
        """Add one document (int64 ids [n], its labels [n] or the ids themselves); yields the rows it
        completes. A document with a payload (what must travel with its tokens, such as images) is never
        cut: it needs cross_rows=False and at most seq_len tokens."""
        if payload is not None and (self.cross_rows or len(document) > self.seq_len):
            raise ValueError(
                f"a document with a payload must fit one row whole (cross_rows=False, {len(document)} <= {self.seq_len} tokens)"
            )
        labels = document if labels is None else labels
        self.stats.documents += 1
        if not self.cross_rows and len(document) > self.seq_len - self._filled and self._filled:
            yield self._emit()
        if payload is not None:
            self._payloads.append(payload)
        offset = 0
        while offset < len(document):
            take = min(self.seq_len - self._filled, len(document) - offset)
            self._ids.append(document[offset : offset + take])
            self._labels.append(labels[offset : offset + take])
            self._docs.append(np.full(take, self._doc_in_row, np.int32))
            self._pos.append(np.arange(offset, offset + take, dtype=np.int64))
            self._filled += take
            offset += take
            if self._filled == self.seq_len:
                yield self._emit()
            else:
                self._doc_in_row += 1

    def flush(self) -> Iterator[Row]:
        """The last, padded row, if anything is left."""
        if self._filled:
            yield self._emit()

    def _emit(self) -> Row:
        pad = self.seq_len - self._filled
        row = Row(
            input_ids=np.concatenate([*self._ids, np.full(pad, self.eos_id, np.int64)]),
            document_ids=np.concatenate([*self._docs, np.full(pad, PAD_DOCUMENT, np.int32)]),
            position_ids=np.concatenate([*self._pos, np.zeros(pad, np.int64)]),
            length=self._filled,
            labels=np.concatenate([*self._labels, np.full(pad, IGNORE_INDEX, np.int64)]),
            payloads=self._payloads,
        )
        self._ids, self._labels, self._payloads, self._docs, self._pos = [], [], [], [], []
        self._filled = self._doc_in_row = 0
        self.stats.rows += 1
        return row


def collate_rows(rows: list[Row]) -> dict[str, torch.Tensor]:
    """Rows -> the batch dict the model takes: input_ids, labels, document_ids, position_ids [B, L]."""
    return {
        "input_ids": torch.from_numpy(np.stack([r.input_ids for r in rows])),
        "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        "document_ids": torch.from_numpy(np.stack([r.document_ids for r in rows])),
        "position_ids": torch.from_numpy(np.stack([r.position_ids for r in rows])),
    }


def cu_seqlens(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """document_ids int [B, L] -> (cu_seqlens int32 [n_segments + 1], max_seqlen) over the flattened
    batch, as flash-attn's varlen kernels take them. Each row's padding is a segment of its own."""
    batch, length = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    positions = torch.nonzero(starts.reshape(-1)).squeeze(1)
    bounds = torch.cat([positions, torch.tensor([batch * length], device=positions.device)]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())
