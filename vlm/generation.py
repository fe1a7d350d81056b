"""Text generation for a VLM: one prefill over the spliced text + image embeddings, then one token per
step through the LLM's KV cache (lvm.attention.KVCache for our transformer, transformers' cache for
theirs), sampled with lvm.generation.sample (greedy at temperature 0, top-k, nucleus).

Rows of different lengths come left- or right-padded with an attention mask; they are left-aligned here,
each row's positions starting at its first real token, as transformers' generate does. A row that emits
EOS is finished: its later tokens are the pad id, and generation stops once every row is finished.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lvm.generation import _check_sampling, sample

if TYPE_CHECKING:
    from vlm.model import VLM


@torch.inference_mode()
def generate(
    model: VLM,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """-> long [B, n] new tokens, n <= max_new_tokens (fewer when every row has finished).

    eos_token_id / pad_token_id default to the model config's; callback(step, tokens [B]) streams."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    config = model.config
    eos = _as_list(config.eos_token_id if eos_token_id is None else eos_token_id)
    pad_id = pad_token_id if pad_token_id is not None else config.pad_token_id
    pad_id = pad_id if pad_id is not None else (eos[0] if eos else 0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        embeds = model.embed_inputs(input_ids, pixel_values, pixel_attention_mask)  # [B, T, C]
        embeds, pad = _left_align(embeds, attention_mask.bool())
        batch, length = embeds.shape[:2]
        generator = None if seed is None else torch.Generator(embeds.device).manual_seed(seed)
        allowed = torch.ones(model.llm.vocab_size, dtype=torch.bool, device=embeds.device)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=embeds.device)
        new = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=embeds.device)
        running = torch.ones(batch, dtype=torch.bool, device=embeds.device)
        cache = model.llm.new_cache(pad, length + max_new_tokens)
        logits = model.llm.step(embeds, cache, 0)
        steps = 0
        for step in range(max_new_tokens):
            if step:
                logits = model.llm.step(model.llm.embed(new[:, step - 1 : step]), cache, length + step - 1)
            tokens = sample(logits, allowed, temperature, top_k, top_p, generator)
            new[:, step] = torch.where(running, tokens, pad_id)
            steps = step + 1
            if callback is not None:
                callback(step, new[:, step])
            running &= ~torch.isin(tokens, eos_ids)
            if not running.any():
                break
    finally:
        model.train(was_training)
    return new[:, :steps]


def _as_list(ids) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def _left_align(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real positions (mask True) to the end -> (embeds [B, T, C], pad long [B])."""
    lengths = mask.sum(dim=1)
    pad = embeds.shape[1] - lengths
    if bool((mask == (torch.arange(mask.shape[1], device=mask.device)[None] >= pad[:, None])).all()):
        return embeds, pad  # already left-padded: real tokens fill each row's tail
    aligned = torch.zeros_like(embeds)
    for row in range(embeds.shape[0]):
        real = embeds[row][mask[row]]
        aligned[row, embeds.shape[1] - real.shape[0] :] = real
    return aligned, pad
