"""Batches for the unified model (vlm/unified.py): one stream mixing three kinds of document in every batch.

    understanding  image -> text, loss on the text only         caption samples by `mixture`; conversations (a
                                                                 `conversations` share of them: the rest are
                                                                 skipped, for a generation-heavy stream)
    generation     caption -> <begin_of_image> <image_code> x T <end_of_image>, loss on the codes only; the
                   caption is replaced by pad tokens with probability `p_uncond` (classifier-free guidance:
                   the unconditional rows at inference are exactly that, as in Janus)
    interleaved    `interleaved_pairs` (caption, image) pairs of consecutive caption samples in one document
                   (EMU / VL-GPT): the context images read through the connector (`<image>`), the last image
                   written as codes; loss on the captions and the written codes

The VLM's stream serves unchanged (vlm.data.VLMStream over data.datamodule.TokenStream: shards, mixing of
sources, shuffle buffer, packing, resume); `pack` chooses each caption sample's kind and builds its document,
and `collate` adds:
    gen_pixels  float [n_written, 3, R, R] in [0, 1], the written images in reading order at the VQ's resolution
                (the LightningModule encodes them with the model's VQ, on its device: the data needs no model)
    kind_ids    long [B, L], KINDS index of each token's document (-1 on padding), for the loss per kind
The text layout of a written image is `vlm.unified_data.image_prompt` (one place: training and inference).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from data.datamodule import _rng
from data.packing import IGNORE_INDEX, Packer
from vlm.data import VLMDataModule, VLMStream, document_field, expand_with_labels

KINDS = ("understanding", "generation", "interleaved")
DEFAULT_MIXTURE = {"understanding": 0.3, "generation": 0.5, "interleaved": 0.2}


def image_prompt(caption: str, examples: list[str] = ()) -> str:
    """The text before a written image: each example caption followed by its image (an `<image>` marker,
    read through the connector), then the caption and `<begin_of_image>`. In-context generation (EMU2) is
    this prompt with examples; plain text-to-image has none."""
    from vlm.text import BEGIN_OF_IMAGE, IMAGE_TOKEN

    context = "".join(f"{example}\n{IMAGE_TOKEN}\n" for example in examples)
    return f"{context}{caption}\n{BEGIN_OF_IMAGE}"


def caption_of(sample: dict, images: list) -> str | None:
    """The caption of a caption sample (one image, one text turn "<image>\\n{caption}"), else None."""
    from vlm.text import IMAGE_TOKEN

    turns = sample.get("turns", [])
    if sample.get("kind") != "caption" or len(images) != 1 or len(turns) != 1 or turns[0]["role"] != "text":
        return None
    return turns[0]["content"].replace(IMAGE_TOKEN, "").strip()


def check_mixture(mixture: Mapping[str, float]) -> dict[str, float]:
    """Normalised {kind: probability} over KINDS; raises naming the kinds on unknown ones or no weight."""
    if unknown := set(mixture) - set(KINDS):
        raise ValueError(f"unknown mixture kinds {sorted(unknown)}; valid kinds: {', '.join(KINDS)}")
    weights = {kind: float(mixture.get(kind, 0.0)) for kind in KINDS}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"mixture weights must be >= 0 and not all 0, got {dict(mixture)}")
    return {kind: w / sum(weights.values()) for kind, w in weights.items()}


class UnifiedStream(VLMStream):
    """VLMStream whose caption samples become understanding, generation or interleaved documents by
    `mixture`; `codes`: (VQ resolution R, codes per image T) of the model (UnifiedDataModule.set_generation)."""

    def __init__(self, *args, mixture: Mapping[str, float], p_uncond: float, interleaved_pairs: int,
                 codes: tuple[int, int], conversations: float = 1.0, **options):
        super().__init__(*args, **options)
        self.mixture, self.p_uncond, self.interleaved_pairs = check_mixture(mixture), p_uncond, interleaved_pairs
        self.conversations = conversations
        self.resolution, self.n_codes = codes

    def new_packer(self) -> Packer:
        # Kinds and caption drops are drawn from a stream seeded per (seed, epoch, reader) and in sample order,
        # so a resumed stream that fast-forwards draws the same ones.
        _, reader, _ = self.reader()
        self._choices, self._pending = _rng(self.seed, self.epoch, reader, 11), []
        return super().new_packer()

    def pack(self, packer: Packer, sample) -> Iterator:
        sample_json, images = sample
        caption = caption_of(sample_json, images)
        if caption is None and self._choices.random() >= self.conversations:
            return
        kind = "understanding" if caption is None else str(self._choices.choice(KINDS, p=list(self.mixture.values())))
        if kind == "understanding":
            yield from self.add(packer, sample_json, super().document(sample_json, images), kind=0, gen_pixels=None)
            return
        if kind == "interleaved":
            self._pending.append((caption, images[0]))
            if len(self._pending) < self.interleaved_pairs:
                return
            pairs, self._pending = self._pending, []
        else:
            pairs = [(caption, images[0])]
        document = self.written_document(pairs, kind)
        if document is not None:
            ids, labels, pixels, written = document
            yield from self.add(packer, sample_json, (ids, labels, pixels), kind=KINDS.index(kind), gen_pixels=written)

    def written_document(self, pairs: list, kind: str):
        """(caption, image) pairs -> (ids, labels, read pixel tiles, written pixels [1, 3, R, R]), or None when too
        long. The last image is written; the others are read. Generation documents train nothing but the codes
        (and may lose their caption); interleaved ones also train their captions."""
        from tokenizer.images import to_tensor
        from vlm.text import END_OF_IMAGE, IMAGE_CODE, IMAGE_TOKEN, encode_turns, generation_token_ids

        *context, (caption, image) = pairs
        text = image_prompt(caption, [c for c, _ in context]) + IMAGE_CODE + END_OF_IMAGE
        ids, labels = encode_turns(self.tokenizer, [{"role": "text", "content": text}])
        ids, labels = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
        special = generation_token_ids(self.tokenizer)
        if kind == "generation":
            labels[:] = IGNORE_INDEX
            if self._choices.random() < self.p_uncond:  # every token between BOS and <begin_of_image> -> pad
                boi = int(np.flatnonzero(ids == special["boi_token_id"])[0])
                ids[1:boi] = self.pad_id
        labels[np.isin(ids, list(special.values()))] = IGNORE_INDEX
        processed = self.processor([image for _, image in context])
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        ids, labels = expand_with_labels(ids.tolist(), labels.tolist(), image_id, processed.tokens_per_image)
        ids, labels = expand_with_labels(ids.tolist(), labels.tolist(), special["code_token_id"], [self.n_codes])
        if len(ids) > self.seq_len:
            return None
        labels[0] = IGNORE_INDEX
        return ids, labels, processed.pixel_values, to_tensor(image, self.resolution)

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        batch = super().collate(rows)
        written = [p["gen_pixels"] for row in rows for p in row.payloads if p["gen_pixels"] is not None]
        size = self.resolution
        batch["gen_pixels"] = torch.cat(written) if written else torch.zeros(0, 3, size, size)
        batch["kind_ids"] = document_field(rows, batch, "kind")
        return batch


class UnifiedDataModule(VLMDataModule):
    """VLMDataModule whose batches mix understanding, generation and interleaved documents (see the module
    docstring). mixture: {kind: weight} for caption samples (conversations are always understanding);
    conversations: the share of conversation samples kept (in the training stream; validation keeps all);
    p_uncond: probability that a generation document loses its caption; interleaved_pairs: (caption, image)
    pairs per interleaved document. The model sets the VQ's resolution and codes per image (set_generation)."""

    def __init__(self, *args, mixture: Mapping[str, float] | None = None, conversations: float = 1.0,
                 p_uncond: float = 0.1, interleaved_pairs: int = 3, **kwargs):
        self.mixture = check_mixture(DEFAULT_MIXTURE if mixture is None else mixture)
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        if not 0.0 <= conversations <= 1.0:
            raise ValueError(f"conversations is the share of conversation samples kept, in [0, 1], got {conversations}")
        if interleaved_pairs < 1:
            raise ValueError(f"interleaved_pairs must be >= 1, got {interleaved_pairs}")
        self.p_uncond, self.interleaved_pairs, self.codes = p_uncond, interleaved_pairs, None
        self.conversations = conversations
        super().__init__(*args, **kwargs)

    def check_sources(self) -> None:
        from vlm.text import generation_token_ids, load_text_tokenizer

        super().check_sources()
        self.generation_ids = generation_token_ids(load_text_tokenizer(self.tokenizer, check=False))

    def set_generation(self, resolution: int, n_codes: int) -> None:
        """The model's VQ: images are written at `resolution` as `n_codes` codes (UnifiedModule.setup)."""
        self.codes = (resolution, n_codes)

    def _stream(self, sets, train: bool) -> UnifiedStream:
        if self.processor is None or self.codes is None:
            raise RuntimeError("UnifiedDataModule needs the model's image processor and VQ: UnifiedModule.setup sets "
                               "them (or call set_processor and set_generation)")
        return UnifiedStream(
            sets, self.seq_len, self.batch_size, self.tokenizer, self.processor, self.sources, pack=self.pack,
            mixture=self.mixture, p_uncond=self.p_uncond, interleaved_pairs=self.interleaved_pairs, codes=self.codes,
            conversations=self.conversations if train else 1.0,
            seed=self.seed, shuffle=train, shuffle_buffer=self.shuffle_buffer, rank=self.rank,
            world_size=self.world_size, tag=train,
        )  # fmt: skip
