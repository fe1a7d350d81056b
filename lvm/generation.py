"""Autoregressive generation for the LVM: one prefill over the prompts, then one token per step with a
preallocated KV cache (lvm.attention.KVCache).

    new = generate(model, prompt_ids, max_new_tokens=256, temperature=1.0, top_k=None, top_p=1.0,
                   seed=None, allowed_ids=None, callback=None, stop_ids=None, compile=False,
                   inputs_embeds=None)   # -> long [B, max_new_tokens] (fewer columns once all rows stopped)

Prompts of different lengths are left-padded into one batch; the cache masks the padding and starts
each row's positions at its first real token, so a batched row equals its prompt generated alone.
Only `allowed_ids` (default: the image codes 0..codebook_size-1) can be produced, whatever the logits
of the special ids: the prompter decodes every new token as an image code.

compile=True decodes as gpt-fast does: the KV cache is static (one buffer per layer, sized for prompt +
new tokens rounded up to a multiple of CACHE_ROUND, reused by later calls of the same batch size and
size class) and the one-token decode step is compiled by inductor with weight freezing (and, on CPU,
max-autotune of its matrix kernels), so a step is a few fused kernels instead of a few hundred
Python-dispatched ops; on CUDA it also runs as a CUDA graph. The prefill stays eager (a few large
matmuls), and sampling stays eager so that seeds give the same tokens as the eager path. The first call
compiles (tens of seconds on CPU); later calls in the process reuse the compiled step as long as the
weights are not changed, so it pays for long or repeated generation, not for one short call.
"""

from __future__ import annotations

import functools
import logging
import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from lvm.attention import KVCache

if TYPE_CHECKING:
    from lvm.model import LVM

log = logging.getLogger(__name__)


CACHE_ROUND = 256  # compiled decoding: cache lengths round up to this, so nearby lengths share a compile
MAX_DECODERS = 4  # compiled decoders (and their caches) kept per model, one per batch size x length class


@torch.inference_mode()
def generate(
    model: LVM,
    prompt_ids: torch.Tensor | list[torch.Tensor] | None,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    allowed_ids: torch.Tensor | list[int] | range | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    stop_ids: list[int] | None = None,
    compile: bool = False,
    inputs_embeds: torch.Tensor | list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Continue each prompt by max_new_tokens tokens -> long [B, max_new_tokens] (the new tokens only).

    prompt_ids: long [B, T], or a list of non-empty 1-D long tensors of any lengths.
    temperature: 0 is greedy (argmax); otherwise logits / temperature are sampled, restricted to the
        top_k most likely ids (None: all) and then to the nucleus of probability top_p (1: all).
    seed: an int makes sampling reproducible (its own torch.Generator); None uses torch's global RNG.
    allowed_ids: the ids that may be produced; default the image codes range(config.codebook_size).
    callback: called as callback(step, tokens [B]) after each new token, for streaming.
    stop_ids: a row that produces one of these ids is finished: its later tokens repeat that id, and
        generation ends early, with fewer columns, once every row has finished (they must be allowed).
    compile: decode with a static cache and a compiled step (module docstring); the same tokens.
    inputs_embeds: instead of prompt_ids, input embeddings float [B, T, hidden] or a list of [T_i, hidden]
        (e.g. a VLM's text with image features spliced in); new tokens are embedded by the model.
    Runs in eval mode (the model's mode is restored after) and in the model's dtype.
    """
    config = model.config
    device = model.lm_head.weight.device
    if (prompt_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of prompt_ids and inputs_embeds")
    if inputs_embeds is not None:
        prompt = _left_pad(inputs_embeds, 2, device, model.lm_head.weight.dtype, config.hidden_size)
    else:
        prompt = _left_pad(prompt_ids, 1, device, torch.long, config.vocab_size)
    batch, prompt_length = prompt.ids.shape[:2]
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    allowed = _allowed_mask(allowed_ids, config, device)
    stops = _stop_ids(stop_ids, allowed)
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
    dtype = model.lm_head.weight.dtype
    if compile:
        decoder = compiled_decoder(model, batch, -(-length // CACHE_ROUND) * CACHE_ROUND, dtype, device)
        cache = decoder.cache
        cache.reset(prompt.pad)
    else:
        cache = KVCache(config.num_layers, prompt.pad, length, config.num_kv_heads, config.head_dim, dtype)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        if inputs_embeds is None:
            logits = model.forward_cached(prompt.ids, cache, start=0)
        else:
            logits = model.forward_cached(None, cache, start=0, inputs_embeds=prompt.ids)
        for step in range(max_new_tokens):
            if step:  # feed the previous token at the slot after the prompt and the tokens before it
                slot, previous = prompt_length + step - 1, new[:, step - 1 : step]
                logits = decoder(model, previous, slot) if compile else model.forward_cached(previous, cache, start=slot)
            new[:, step] = sample(logits, allowed, temperature, top_k, top_p, generator)
            if stops is not None:
                new[:, step] = torch.where(finished, new[:, step - 1], new[:, step])
                finished |= torch.isin(new[:, step], stops)
            if callback is not None:
                callback(step, new[:, step])
            if stops is not None and finished.all():
                return new[:, : step + 1]
    finally:
        model.train(was_training)
    return new


class CompiledDecoder:
    """A static KV cache for `batch` rows of `length` slots and the one-token decode step compiled for it.

    decoder(model, ids [B, 1], slot) -> logits [B, vocab]: feeds the tokens at cache slot `slot`. The slot and
    the ids are copied into buffers of the decoder, so the compiled step never specialises on the slot's
    value or the ids' strides. Inductor freezes the weights (folds
    them in as constants and prepacks them for its matmul kernels), set through its config flag:
    torch.compile(options={"freezing": True}) is silently ignored. Frozen weights are why a decoder is
    rebuilt when the parameters change (see compiled_decoder).
    """

    def __init__(self, model: LVM, batch: int, length: int, dtype: torch.dtype, device: torch.device):
        config = model.config
        pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.cache = KVCache(config.num_layers, pad, length, config.num_kv_heads, config.head_dim, dtype)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the fed tokens, fixed strides
        self.weights = _weights_key(model)
        cuda = device.type == "cuda"
        if cuda:  # CUDA graphs replay on fixed addresses: the cache is updated there, never copied in
            for buffer in (*self.cache.k, *self.cache.v, self.cache.pad, self.slot, self.ids):
                torch._dynamo.mark_static_address(buffer)
        # Dynamo keeps compiled graphs on the function's code object, and their guards do not look at
        # weight values: a code object of its own keeps frozen weights from serving another decoder.
        step = types.FunctionType(_decode_step.__code__.replace(), _decode_step.__globals__)
        # On CPU max-autotune benchmarks inductor's C++ GEMM templates (weights prepacked into blocks,
        # epilogues fused) against the MKL calls: at batch 1 a step is matrix-vector products, and the
        # templates read the weights ~1.4x faster.
        self.step = torch.compile(
            functools.partial(step, self.cache),  # not the model: decoders live in a dict weakly keyed by it
            fullgraph=True,
            dynamic=False,
            mode="reduce-overhead" if cuda else "max-autotune-no-cudagraphs",
        )
        self.compiled = False

    def __call__(self, model: LVM, ids: torch.Tensor, slot: int) -> torch.Tensor:
        self.slot.fill_(slot)
        self.ids.copy_(ids)
        if self.compiled:
            # Dynamo's guards (hundreds of checks on the model's attributes, ~0.1-0.4 ms a step) are
            # skipped: every input is this decoder's own buffer, and weight changes are caught by
            # compiled_decoder's own key, which builds a new decoder.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self.step(model, self.ids, self.slot)
        # Inductor's config is read when compiling only; patching it costs ~1 ms, so not at every step.
        with torch._inductor.config.patch(freezing=True, max_autotune_report_choices_stats=False):
            logits = self.step(model, self.ids, self.slot)
        self.compiled = True
        return logits


def _decode_step(cache: KVCache, model: LVM, ids: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """ids long [B, 1] at cache slot `slot` (long [1]) -> logits [B, vocab]."""
    positions = (slot - cache.pad)[:, None]  # [B, 1]; the slot is past every row's padding
    return model.lm_head(model._hidden(model.model.embed_tokens(ids), positions, cache.static_attends(slot))[:, -1])


# model -> {(batch, length, dtype, device): CompiledDecoder}; weak, so a deleted model frees its decoders
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decoder(model: LVM, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> CompiledDecoder:
    """The model's decoder for these shapes, compiled on first use and kept for later calls in this
    process; rebuilt (and recompiled) when the model's weights were changed or replaced since."""
    decoders = _DECODERS.setdefault(model, {})
    key = (batch, length, dtype, str(device))
    decoder = decoders.get(key)
    if decoder is None or decoder.weights != _weights_key(model):
        log.info("compiling the decode step for batch %d, cache length %d (once per shape)", batch, length)
        decoders.pop(key, None)
        if len(decoders) >= MAX_DECODERS:  # each holds a KV cache: drop the oldest shape
            del decoders[next(iter(decoders))]
        decoders[key] = decoder = CompiledDecoder(model, batch, length, dtype, device)
    return decoder


def _weights_key(model: LVM) -> tuple:
    """Changes whenever a parameter is replaced or updated in place (an optimizer step bumps _version)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


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
    """Prompts left-padded into ids long [B, T] (or embeddings [B, T, hidden]); pad long [B] is each
    row's number of padding slots."""

    ids: torch.Tensor
    pad: torch.Tensor


def _left_pad(prompts, item_dim: int, device: torch.device, dtype: torch.dtype, size: int) -> _Prompt:
    """Token ids (item_dim 1: ids in [0, size)) or embeddings (item_dim 2: [T, size]) left-padded."""
    what = "prompt_ids" if item_dim == 1 else "inputs_embeds"
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != item_dim + 1:
            shape = "[B, T]" if item_dim == 1 else "[B, T, hidden]"
            raise ValueError(f"{what} must be {shape} or a list of prompts, got shape {tuple(prompts.shape)}")
        prompts = list(prompts)
    if not prompts or any(p.dim() != item_dim or p.shape[0] == 0 for p in prompts):
        raise ValueError(f"{what} must hold at least one prompt, each a non-empty {item_dim}-D tensor")
    if item_dim == 2 and any(p.shape[1] != size for p in prompts):
        raise ValueError(f"inputs_embeds must have the model's hidden size {size} in their last dimension")
    lengths = torch.tensor([p.shape[0] for p in prompts], device=device)
    # Padding (id 0 or zero vectors) is masked out of attention.
    ids = torch.zeros(len(prompts), int(lengths.max()), *prompts[0].shape[1:], dtype=dtype, device=device)
    for row, p in zip(ids, prompts, strict=True):
        row[row.shape[0] - p.shape[0] :] = p
    if item_dim == 1 and (ids.min() < 0 or ids.max() >= size):
        raise ValueError(f"prompt ids must lie in [0, {size}), got [{int(ids.min())}, {int(ids.max())}]")
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


def _stop_ids(stop_ids, allowed: torch.Tensor) -> torch.Tensor | None:
    if not stop_ids:
        return None
    stops = torch.as_tensor(list(stop_ids), dtype=torch.long, device=allowed.device)
    if stops.min() < 0 or stops.max() >= allowed.numel() or not allowed[stops].all():
        raise ValueError(f"stop_ids {list(stop_ids)} must be ids that may be produced (in allowed_ids)")
    return stops
