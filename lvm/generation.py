"""Autoregressive generation for the LVM: one prefill over the prompts, then one token per step with a
preallocated KV cache (lvm.attention.KVCache).

    new = generate(model, prompt_ids, max_new_tokens=256, temperature=1.0, top_k=None, top_p=1.0,
                   seed=None, allowed_ids=None, callback=None)   # -> long [B, max_new_tokens]

Prompts of different lengths are left-padded into one batch; the cache masks the padding and starts
each row's positions at its first real token, so a batched row equals its prompt generated alone.
Only `allowed_ids` (default: the image codes 0..codebook_size-1) can be produced, whatever the logits
of the special ids: the prompter decodes every new token as an image code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from lvm.attention import KVCache

if TYPE_CHECKING:
    from lvm.model import LVM

log = logging.getLogger(__name__)


@torch.inference_mode()
def generate(
    model: LVM,
    prompt_ids: torch.Tensor | list[torch.Tensor],
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    allowed_ids: torch.Tensor | list[int] | range | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Continue each prompt by max_new_tokens tokens -> long [B, max_new_tokens] (the new tokens only).

    prompt_ids: long [B, T], or a list of non-empty 1-D long tensors of any lengths.
    temperature: 0 is greedy (argmax); otherwise logits / temperature are sampled, restricted to the
        top_k most likely ids (None: all) and then to the nucleus of probability top_p (1: all).
    seed: an int makes sampling reproducible (its own torch.Generator); None uses torch's global RNG.
    allowed_ids: the ids that may be produced; default the image codes range(config.codebook_size).
    callback: called as callback(step, tokens [B]) after each new token, for streaming.
    Runs in eval mode (the model's mode is restored after) and in the model's dtype.
    """
    config = model.config
    device = model.lm_head.weight.device
    prompt = _left_pad(prompt_ids, config.vocab_size, device)
    batch, prompt_length = prompt.ids.shape
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    allowed = _allowed_mask(allowed_ids, config, device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    new = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return new

    # The last new token is never fed back, so the cache needs one slot less than prompt + new.
    length = prompt_length + max_new_tokens - 1
    if length > config.max_position_embeddings:
        log.warning(
            "generating up to %d tokens, beyond max_position_embeddings %d the model was configured for",
            length,
            config.max_position_embeddings,
        )
    cache = KVCache(
        config.num_layers, prompt.pad, length, config.num_kv_heads, config.head_dim, model.lm_head.weight.dtype
    )
    was_training = model.training
    model.eval()
    try:
        logits = model.forward_cached(prompt.ids, cache, start=0)
        for step in range(max_new_tokens):
            if step:  # feed the previous token at the slot after the prompt and the tokens before it
                logits = model.forward_cached(new[:, step - 1 : step], cache, start=prompt_length + step - 1)
            new[:, step] = sample(logits, allowed, temperature, top_k, top_p, generator)
            if callback is not None:
                callback(step, new[:, step])
    finally:
        model.train(was_training)
    return new


def sample(
    logits: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, vocab] -> long [B]: one id per row among `allowed` (bool [vocab]), greedy at
    temperature 0. Filtering is done in fp32 with -inf, so excluded ids have probability exactly 0."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop an id when the more likely ids already reach top_p: the nucleus is the smallest set with
        # mass >= top_p, and the most likely id always stays (its preceding mass is 0).
        outside = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


class _Prompt(NamedTuple):
    """Prompts left-padded into ids long [B, T]; pad long [B] is each row's number of padding slots."""

    ids: torch.Tensor
    pad: torch.Tensor


def _left_pad(prompt_ids: torch.Tensor | list[torch.Tensor], vocab_size: int, device: torch.device) -> _Prompt:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [B, T] or a list of 1-D tensors, got shape {tuple(prompt_ids.shape)}")
        prompt_ids = list(prompt_ids)
    if not prompt_ids or any(p.dim() != 1 or p.numel() == 0 for p in prompt_ids):
        raise ValueError("prompt_ids must hold at least one prompt, each a non-empty 1-D tensor of token ids")
    lengths = torch.tensor([p.numel() for p in prompt_ids], device=device)
    ids = torch.zeros(len(prompt_ids), int(lengths.max()), dtype=torch.long, device=device)  # padding: id 0, masked
    for row, p in zip(ids, prompt_ids, strict=True):
        row[row.numel() - p.numel() :] = p
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"prompt ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    return _Prompt(ids, ids.shape[1] - lengths)


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _allowed_mask(allowed_ids, config, device: torch.device) -> torch.Tensor:
    """bool [vocab]: True for the ids generation may produce."""
    ids = torch.as_tensor(range(config.codebook_size) if allowed_ids is None else allowed_ids, dtype=torch.long)
    if ids.numel() == 0 or ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"allowed_ids must be a non-empty set of ids in [0, {config.vocab_size})")
    allowed = torch.zeros(config.vocab_size, dtype=torch.bool, device=device)
    allowed[ids.to(device)] = True
    return allowed
