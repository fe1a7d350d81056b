"""The VLM: vision encoder -> connector -> image tokens spliced at the `<image>` placeholders -> LLM.

    pixels [n_images, 3, H, W] -> encoder -> features [n_images, N, C_vis], grid (h, w)
                               -> connector -> image tokens [n_images, n, C]      (n: connector.num_tokens(grid))
    input_ids [B, L] -> llm.embed -> [B, L, C], image tokens written at the placeholders
                     -> llm -> logits [B, L, vocab]; loss on labels != -100 (never on image positions)

A VLM may also write images (config.generation, vlm/image_generation.py): VQ codes in through gen_embed
at the code placeholders, the next code's logits out of gen_head, generate_images with guidance,
decode_images through the VQ tokenizer (gen_tokenizer).

One class serves our own models and the transformers families (LLaVA, InternVL, Idefics2, Janus): a loaded
family is this pipeline with its weights renamed (vlm/hf_families.py), not a wrapper of its HF class.
The encoder and LLM may be transformers modules; the connector is always one of `vlm.connectors`.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lvm.config import NamedConfig
from vlm import connectors
from vlm import image_generation as gen
from vlm.encoders import build_encoder
from vlm.llm import build_llm
from vlm.splice import IGNORE_INDEX, mask_image_labels, splice

OWN_MODEL_TYPE = "lvm_vlm"


@dataclass
class VLMConfig(NamedConfig):  # no presets: a VLM is built from its parts' specs
    """encoder / llm: specs for vlm.encoders.build_encoder / vlm.llm.build_llm; connector: a name in
    vlm.connectors with its options. `family` is "own" or the transformers family it was loaded from,
    whose config.json (`family_config`) is kept so save_pretrained writes that family's layout back."""

    encoder: dict
    llm: dict
    image_token_id: int
    connector: str = "mlp2x_gelu"
    connector_options: dict = field(default_factory=dict)
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    family: str = "own"
    family_config: dict | None = None
    generation: dict | None = None  # the generation side's spec (vlm/image_generation.py); None: reads only

    def to_dict(self) -> dict:
        values = super().to_dict()
        if values["generation"] is None:  # a VLM that only reads images writes the files it always wrote
            del values["generation"]
        return {"model_type": OWN_MODEL_TYPE, **values}


class VLMOutput(NamedTuple):
    logits: torch.Tensor  # [B, L, vocab]
    loss: torch.Tensor | None = None  # text_loss + image_loss (the present ones)
    image_logits: torch.Tensor | None = None  # [n_written, T, codebook]: each written code's logits
    text_loss: torch.Tensor | None = None  # mean over the text targets; None without any
    image_loss: torch.Tensor | None = None  # mean over the written codes; None without any


class VLM(nn.Module):
    def __init__(self, config: VLMConfig, encoder: nn.Module | None = None, connector: nn.Module | None = None,
                 llm: nn.Module | None = None):
        """Parts are built from `config`, or passed in already built (they must then match it)."""
        super().__init__()
        self.config = config
        self.encoder = encoder or build_encoder(config.encoder)
        self.llm = llm or build_llm(config.llm)
        self.connector = connector or connectors.build(
            config.connector, self.encoder.out_dim, self.llm.hidden_size, **config.connector_options
        )
        self._check_widths()
        if config.generation is not None:
            self._build_generation(config.generation)

    def _check_widths(self) -> None:
        """A connector that does not map the encoder's width to the LLM's fails here, not mid-training."""
        grid = (4, 4)
        probe = torch.zeros(1, grid[0] * grid[1], self.encoder.out_dim)
        try:
            with torch.no_grad():
                out = self.connector(probe, grid)
        except RuntimeError as error:
            raise ValueError(
                f"connector {self.config.connector!r} does not take the vision encoder's width "
                f"{self.encoder.out_dim} (LLM hidden size {self.llm.hidden_size}): {error}"
            ) from error
        if out.shape[-1] != self.llm.hidden_size:
            raise ValueError(
                f"connector {self.config.connector!r} outputs width {out.shape[-1]} but the LLM's hidden size is "
                f"{self.llm.hidden_size}: the vision and LLM widths must meet at the connector"
            )

    # -- images -> tokens ------------------------------------------------------------------------------
    def image_embeds(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [n_images, 3, H, W] (or Idefics2's [B, max_images, 3, H, W], all-zero images being
        padding) -> image tokens [n_images, n, C] in the LLM's width."""
        if pixel_values.dim() == 5:
            pixel_values, pixel_attention_mask = _drop_padding_images(pixel_values, pixel_attention_mask)
        extra = {} if pixel_attention_mask is None else {"pixel_attention_mask": pixel_attention_mask}
        out = self.encoder(pixel_values.to(self._dtype()), **extra)
        # Only the resamplers (perceiver, qformer) can leave padded patches out; grid connectors keep the grid.
        takes_mask = out.mask is not None and "attention_mask" in inspect.signature(self.connector.forward).parameters
        return self.connector(out.features, out.grid, **({"attention_mask": out.mask} if takes_mask else {}))

    def num_image_tokens(self, grid: tuple[int, int]) -> int:
        """Image tokens per image (per tile) for an encoder grid (h, w): what the processor expands to."""
        return self.connector.num_tokens(grid)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values=None, pixel_attention_mask=None) -> torch.Tensor:
        """Text embeddings [B, L, C] with the image tokens written at the placeholders."""
        embeds = self.llm.embed(input_ids)
        if pixel_values is None or pixel_values.shape[0] == 0:  # a text-only batch
            if (input_ids == self.config.image_token_id).any():
                raise ValueError("input_ids hold <image> placeholders but no pixel_values were given")
            return embeds
        return splice(embeds, input_ids, self.image_embeds(pixel_values, pixel_attention_mask), self.config.image_token_id)

    # -- forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_codes: torch.Tensor | None = None,
    ) -> VLMOutput:
        """The tensors a family's HF processor gives its HF model (placeholders already expanded) ->
        VLMOutput. With labels: next-token cross entropy over positions whose label is not -100; image
        positions (read or written) never carry text loss. image_codes long [n_written, T]: the codes of the
        images written at the code placeholders, in reading order; each code's loss is read from the
        position before it. Packed training rows (vlm.data) pass document_ids and position_ids instead of
        an attention mask."""
        embeds = gen.splice_codes(self, self.embed_inputs(input_ids, pixel_values, pixel_attention_mask), input_ids,
                                  image_codes)
        hidden = self.llm.hidden(embeds, attention_mask, document_ids, position_ids)  # [B, L, C]
        logits = self.llm.head(hidden)
        codes_logits = None if image_codes is None else gen.image_logits(self, hidden, input_ids, image_codes.shape[0])
        text_loss = image_loss = loss = None
        if labels is not None:
            labels = mask_image_labels(labels, input_ids, self.config.image_token_id)
            if image_codes is not None:
                labels = mask_image_labels(labels, input_ids, self.config.generation["code_token_id"])
            targets = labels[:, 1:]
            if (targets != IGNORE_INDEX).any():
                text_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                            ignore_index=IGNORE_INDEX)
        if codes_logits is not None and image_codes.numel():
            image_loss = F.cross_entropy(codes_logits.flatten(0, 1).float(), image_codes.flatten())
        if parts := [part for part in (text_loss, image_loss) if part is not None]:
            loss = sum(parts[1:], parts[0])
        elif labels is not None:  # nothing to learn in this batch: a zero that still reaches every parameter
            loss = logits.sum() * 0.0
        return VLMOutput(logits, loss, codes_logits, text_loss, image_loss)

    def generate(self, input_ids: torch.Tensor, pixel_values=None, attention_mask=None, **options) -> torch.Tensor:
        """The new tokens only, long [B, n]; see vlm.generation.generate for the options."""
        from vlm.generation import generate

        return generate(self, input_ids, pixel_values, attention_mask, **options)

    # -- writing images (the generation side) ----------------------------------------------------------
    def generate_images(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, **options) -> torch.Tensor:
        """Codes long [B, T] for prompts ending with begin-of-image; see vlm.image_generation.generate_images
        (guidance_scale=5.0, temperature=1.0, top_k, top_p, generator)."""
        return gen.generate_images(self, input_ids, attention_mask, pixel_values, **options)

    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """codes long [B, T] -> float pixels [B, 3, H, W] in [0, 1]."""
        if codes.dim() != 2 or codes.shape[1] != self.codes_per_image:
            raise ValueError(f"decode_images takes codes [B, {self.codes_per_image}] (this model's VQ grid of "
                             f"{self.codes_per_image} codes), got shape {tuple(codes.shape)}")
        return self.gen_tokenizer.decode(codes)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [0, 1] -> codes long [B, T]: training targets for the generation side."""
        if self.config.generation is None:
            raise ValueError(gen.NO_GENERATION_SIDE)
        side = self.gen_tokenizer.config.resolution
        if images.dim() != 4 or tuple(images.shape[-2:]) != (side, side):
            raise ValueError(f"encode_images takes images [B, 3, {side}, {side}] (the VQ tokenizer's resolution), got "
                             f"{tuple(images.shape)}; resize them first (tokenizer.fit_to_resolution)")
        return self.gen_tokenizer.encode(images)

    def add_generation(self, spec: dict) -> None:
        """Give a VLM that only reads images a generation side (e.g. a VLM export plus a trained VQGAN:
        tokenizer {"kind": "vqgan", "path": dir}): the VQ model from the spec, gen_embed and gen_head fresh."""
        if self.config.generation is not None:
            raise ValueError("this VLM already has a generation side (config.generation is set)")
        self._build_generation(spec)
        device = next(self.connector.parameters()).device
        self.gen_tokenizer.to(device)
        self.gen_embed.to(device, self._dtype())
        self.gen_head.to(device, self._dtype())

    def _build_generation(self, spec: dict) -> None:
        self.config.generation, self.gen_tokenizer, self.gen_embed, self.gen_head = gen.build(spec, self.llm.hidden_size)

    @property
    def codes_per_image(self) -> int:
        """T: the codes of one written image (the VQ grid h*w)."""
        if self.config.generation is None:
            raise ValueError(gen.NO_GENERATION_SIDE)
        return self.gen_tokenizer.config.tokens_per_image

    def _dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    # -- checkpoints -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> VLM:
        """Our own directory (config.json + model.safetensors) or a transformers LLaVA / InternVL /
        Idefics2 / Janus directory, loaded into this pipeline."""
        from lvm.checkpoints import read_state_dict
        from vlm import hf_families

        path = Path(path)
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{path} holds no config.json: not a saved VLM")
        values = json.loads(config_file.read_text())
        model_type = values.get("model_type")
        if model_type == OWN_MODEL_TYPE:
            config, state = VLMConfig.from_dict(values), read_state_dict(path)
        elif model_type in hf_families.FAMILIES:
            generation_file = path / "generation_config.json"  # Janus keeps its begin-of-image id there
            generation_config = json.loads(generation_file.read_text()) if generation_file.exists() else None
            config = hf_families.config_from_hf(values, generation_config)
            state = hf_families.state_from_hf(model_type, read_state_dict(path), config)
        else:
            raise ValueError(
                f"{path}: unsupported model_type {model_type!r}; supported: {OWN_MODEL_TYPE!r} (ours) and the "
                f"transformers families {', '.join(map(repr, hf_families.FAMILIES))}"
            )
        model = cls(config)
        model.load_weights(state, str(path))
        return model.to(dtype)

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        from lvm.checkpoints import check_state_dict

        check_state_dict(self.state_dict(), state, source)
        self.load_state_dict(state)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """A transformers family's layout (loadable by AutoModelForImageTextToText) for loaded families,
        else our config.json + model.safetensors."""
        from lvm.checkpoints import atomic_path, save_pretrained_dir
        from vlm import hf_families

        tensors = _unshared(self.state_dict())
        if self.config.family == "own":
            save_pretrained_dir(directory, self.config.to_dict(), tensors)
        else:
            save_pretrained_dir(directory, self.config.family_config, hf_families.state_to_hf(self.config.family, tensors))
            if (self.config.generation or {}).get("family_generation_config"):
                with atomic_path(Path(directory) / "generation_config.json") as tmp:
                    Path(tmp).write_text(json.dumps(self.config.generation["family_generation_config"], indent=2))


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): later sharers get their own copy."""
    seen, out = set(), {}
    for key, value in state.items():
        value = value.detach()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def _drop_padding_images(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None):
    """Idefics2's batched images [B, max_images, 3, H, W]: all-zero images pad samples with fewer
    images; keep the real ones, in order -> [n_images, 3, H, W] and their pixel masks [n_images, H, W]."""
    flat = pixel_values.flatten(0, 1)
    real = (flat != 0).flatten(1).any(dim=1)
    if pixel_attention_mask is not None:
        pixel_attention_mask = pixel_attention_mask.flatten(0, 1)[real]
    return flat[real], pixel_attention_mask
