"""The VLM: vision encoder -> connector -> image tokens spliced at the `<image>` placeholders -> LLM.

    pixels [n_images, 3, H, W] -> encoder -> features [n_images, N, C_vis], grid (h, w)
                               -> connector -> image tokens [n_images, n, C]      (n: connector.num_tokens(grid))
    input_ids [B, L] -> llm.embed -> [B, L, C], image tokens written at the placeholders
                     -> llm -> logits [B, L, vocab]; loss on labels != -100 (never on image positions)

One class serves our own models and the transformers families (LLaVA, InternVL, Idefics2): a loaded
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

    def to_dict(self) -> dict:
        return {"model_type": OWN_MODEL_TYPE, **super().to_dict()}


class VLMOutput(NamedTuple):
    logits: torch.Tensor  # [B, L, vocab]
    loss: torch.Tensor | None = None


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
    ) -> VLMOutput:
        """The tensors a family's HF processor gives its HF model (placeholders already expanded) ->
        VLMOutput(logits [B, L, vocab], loss). With labels: next-token cross entropy over positions whose
        label is not -100; image positions never carry loss. Packed training rows (vlm.data) pass
        document_ids and position_ids instead of an attention mask."""
        embeds = self.embed_inputs(input_ids, pixel_values, pixel_attention_mask)
        logits = self.llm(embeds, attention_mask, document_ids, position_ids)
        loss = None
        if labels is not None:
            labels = mask_image_labels(labels, input_ids, self.config.image_token_id)
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        return VLMOutput(logits, loss)

    def generate(self, input_ids: torch.Tensor, pixel_values=None, attention_mask=None, **options) -> torch.Tensor:
        """The new tokens only, long [B, n]; see vlm.generation.generate for the options."""
        from vlm.generation import generate

        return generate(self, input_ids, pixel_values, attention_mask, **options)

    def _dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    # -- checkpoints -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> VLM:
        """Our own directory (config.json + model.safetensors) or a transformers LLaVA / InternVL /
        Idefics2 directory, loaded into this pipeline."""
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
            config = hf_families.config_from_hf(values)
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
        from lvm.checkpoints import save_pretrained_dir
        from vlm import hf_families

        tensors = _unshared(self.state_dict())
        if self.config.family == "own":
            save_pretrained_dir(directory, self.config.to_dict(), tensors)
        else:
            save_pretrained_dir(directory, self.config.family_config, hf_families.state_to_hf(self.config.family, tensors))


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
