"""Causal attention backends, chosen at run time, all with the same contract.

`build(backend, document_ids, length, device, prefix_len=None)` returns `attend(q, k, v) -> out` with
    q  [B, H, L, D]      k, v  [B, Hkv, L, D]  (H a multiple of Hkv: grouped-query attention)
    out [B, H, L, D]
Without document ids attention is plain causal. With them (int [B, L], -1 on padding) it is
block-diagonal causal: a token sees the earlier tokens of its own document only, so sentences packed
into one row do not attend to each other. Padding forms one block of its own, so every query sees at
least itself and no softmax row is empty (no NaNs).
With `prefix_len` k (an int, or long [B] for one per row) it is prefix-causal, as in PrefixLM and AIM:
query i sees key j iff j <= max(i, k - 1), so the first k positions see each other both ways and later
ones causally; k >= L is full bidirectional attention, k <= 1 plain causal.

Backends:
    xformers  memory_efficient_attention; the fastest on CUDA, but it has no CPU kernels
    sdpa      torch.nn.functional.scaled_dot_product_attention (is_causal, or a boolean block mask)
    flex      torch.nn.attention.flex_attention with a block mask built from the document ids; on CPU
              forward only (torch has no CPU backward for it) and unfused
    eager     explicit softmax(q k^T / sqrt(D)) v: the readable reference the others are tested against
    auto      xformers where its kernels run on the tensors' device, else sdpa (and logs why)
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def block_causal_mask(document_ids: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """bool [B or 1, 1, L, L], True where query i may attend to key j: j <= i and same document."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if document_ids is None:
        return causal[None, None]
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # [B, L, L]
    return (same_document & causal)[:, None]


def prefix_causal_mask(prefix_len: int | torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    """bool [B or 1, 1, L, L], True where query i may attend to key j: j <= max(i, k - 1)."""
    positions = torch.arange(length, device=device)
    k = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1)  # [B or 1, 1, 1]
    return (positions[None, None, :] <= torch.maximum(positions[None, :, None], k - 1))[:, None]


# -- backend choice ------------------------------------------------------------------------------------
def xformers_unavailable(device: torch.device) -> str | None:
    """Why xformers cannot run attention on `device`, or None when it can (probed once per device)."""
    return _xformers_probe(device.type)


@functools.lru_cache
def _xformers_probe(device_type: str) -> str | None:
    try:
        import xformers.ops as xops
    except ImportError:
        return "xformers not installed"
    if device_type != "cuda":
        return f"xformers has no {device_type.upper()} kernels"
    try:  # installed, but built for another CUDA / GPU generation: find out with a tiny call
        x = torch.zeros(1, 8, 1, 64, device=device_type, dtype=torch.float16)
        xops.memory_efficient_attention(x, x, x, attn_bias=xops.LowerTriangularMask())
    except Exception as error:  # noqa: BLE001 - any failure means "do not use it"
        return f"xformers kernels failed on {device_type}: {str(error).splitlines()[0]}"
    return None


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that will run: `auto` becomes xformers or sdpa; explicit choices are checked."""
    if requested == "auto":
        return _auto(device.type)
    if requested == "xformers" and (reason := xformers_unavailable(device)):
        raise RuntimeError(f"attn_backend='xformers' cannot run on {device.type}: {reason}; use 'auto' or 'sdpa'")
    if requested == "flex" and device.type == "cpu" and torch.is_grad_enabled():
        raise RuntimeError(
            "attn_backend='flex' has no backward on CPU in this torch (forward only: run under "
            "torch.no_grad()); use 'sdpa' to train on CPU"
        )
    return requested


@functools.lru_cache
def _auto(device_type: str) -> str:
    reason = _xformers_probe(device_type)
    if reason is None:
        log.info("attention backend: xformers (its kernels run on %s)", device_type)
        return "xformers"
    log.info("attention backend: sdpa (%s)", reason)
    return "sdpa"


# -- backends ------------------------------------------------------------------------------------------
def build(
    backend: str,
    document_ids: torch.Tensor | None,
    length: int,
    device: torch.device,
    prefix_len: int | torch.Tensor | None = None,
) -> Attend:
    """The attend function for one forward pass; masks are built here once and shared by all layers."""
    backend = resolve_backend(backend, device)
    if prefix_len is not None:
        return _prefix(backend, prefix_len, length, device, document_ids)
    if backend == "xformers":
        return _xformers(document_ids)
    if backend == "flex":
        return _flex(document_ids, length, device)
    if backend == "eager":
        mask = block_causal_mask(document_ids, length, device)
        return functools.partial(_eager, mask=mask)
    if document_ids is None:
        return functools.partial(F.scaled_dot_product_attention, is_causal=True, enable_gqa=True)
    mask = block_causal_mask(document_ids, length, device)
    return functools.partial(F.scaled_dot_product_attention, attn_mask=mask, enable_gqa=True)


def _prefix(backend: str, prefix_len, length: int, device: torch.device, document_ids) -> Attend:
    if document_ids is not None:
        raise ValueError("prefix_len and document_ids do not combine: a prefix mask is for one sequence per row")
    if isinstance(prefix_len, int) and prefix_len <= 1:  # plain causal: every backend's fast path
        return build(backend, None, length, device)
    mask = prefix_causal_mask(prefix_len, length, device)
    if backend == "eager":
        return functools.partial(_eager, mask=mask)
    if backend == "xformers":
        return _xformers(None, mask=mask)
    if backend == "flex":
        last = torch.as_tensor(prefix_len, device=device).reshape(-1) - 1  # [B or 1]
        per_row = len(last) > 1

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= torch.maximum(q_idx, last[b] if per_row else last[0])

        return _flex_kernel(mask_mod, len(last) if per_row else None, length, device)
    if isinstance(prefix_len, int) and prefix_len >= length:  # bidirectional: no mask to read
        return functools.partial(F.scaled_dot_product_attention, enable_gqa=True)
    return functools.partial(F.scaled_dot_product_attention, attn_mask=mask, enable_gqa=True)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, L, D]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, L, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def xformers_bias(document_ids: torch.Tensor | None):
    """The xformers attention bias: LowerTriangularMask, or for packed rows one causal block per
    document over the flattened batch (each row's padding is a block of its own)."""
    from xformers.ops import fmha

    from data.packing import cu_seqlens  # here: `data` pulls in Lightning, which the model does not need

    if document_ids is None:
        return fmha.attn_bias.LowerTriangularMask()
    bounds, _ = cu_seqlens(document_ids)
    return fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens((bounds[1:] - bounds[:-1]).tolist())


def _xformers(document_ids: torch.Tensor | None, mask: torch.Tensor | None = None) -> Attend:
    """`mask` (bool [B or 1, 1, L, L], e.g. a prefix mask) goes in as an additive bias tensor."""
    from xformers.ops import memory_efficient_attention

    bias = xformers_bias(document_ids) if mask is None else None

    def attend(q, k, v):
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        # xformers wants [B, L, H, D]; grouped-query attention as [B, L, Hkv, H/Hkv, D] with k, v expanded.
        q5 = q.transpose(1, 2).reshape(batch, length, kv_heads, heads // kv_heads, dim)
        k5, v5 = (t.transpose(1, 2)[:, :, :, None].expand_as(q5) for t in (k, v))
        if document_ids is not None:  # block-diagonal biases index one flattened sequence
            q5, k5, v5 = (t.reshape(1, batch * length, *t.shape[2:]) for t in (q5, k5, v5))
        out = memory_efficient_attention(q5, k5, v5, attn_bias=bias if mask is None else _tensor_bias(mask, q5))
        return out.reshape(batch, length, heads, dim).transpose(1, 2)

    return attend


def _tensor_bias(mask: torch.Tensor, q5: torch.Tensor) -> torch.Tensor:
    """bool [B or 1, 1, L, L] -> additive bias [B, Hkv, H/Hkv, L, L] in q's dtype. xformers wants the
    key dimension's storage aligned to 8 elements: built wider, then sliced."""
    batch, length, kv_heads, groups, _ = q5.shape
    padded = torch.zeros(mask.shape[0], 1, 1, length, -(-length // 8) * 8, dtype=q5.dtype, device=q5.device)
    padded[..., :length].masked_fill_(~mask[:, :, None], float("-inf"))
    return padded[..., :length].expand(batch, kv_heads, groups, length, length)


def _flex(document_ids: torch.Tensor | None, length: int, device: torch.device) -> Attend:
    if document_ids is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    return _flex_kernel(mask_mod, None if document_ids is None else document_ids.shape[0], length, device)


def _flex_kernel(mask_mod, batch: int | None, length: int, device: torch.device) -> Attend:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(mask_mod, batch, None, length, length, device=device)
    # Fused kernels need torch.compile; on CPU flex runs unfused (a reference, and torch warns so).
    kernel = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    return functools.partial(kernel, block_mask=block_mask, enable_gqa=True)


# -- KV cache (generation) -----------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer for generation, preallocated for the whole run: one pair of
    buffers per layer, k[i], v[i] [B, Hkv, S, D]. A step writes its tokens' keys and values in place
    into their slots; nothing is reallocated as the text grows. (One buffer per layer, not one 5-D
    tensor: a compiled decode step updating a slice of one big buffer ran 3x slower.)

    Rows are left-padded: row b's first `pad[b]` slots are padding, never attended to, and its first
    real token has position 0, so a row generates exactly what its prompt would generate alone.
    Two ways to attend, both through sdpa (the training backends' masks are built for square,
    full-sequence attention; the eager backend keeps its own kernel in `attends`):
        attends(start, stop)   eager steps: write slots start..stop-1, attend over slots 0..stop-1
        static_attends(slot)   compiled decode steps: one token at the slot given as a tensor, attends
                               over all S slots under a mask, so every step has the same shapes
    """

    def __init__(self, layers: int, pad: torch.Tensor, length: int, kv_heads: int, head_dim: int, dtype):
        self.length = length
        shape = (pad.shape[0], kv_heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=pad.device) for _ in range(layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.pad = torch.zeros_like(pad)
        self.reset(pad)

    def reset(self, pad: torch.Tensor) -> None:
        """Reuse the buffers for new prompts padded by pad long [B]. Old keys and values stay in the
        buffers but are never attended to: every slot is written before a query can see it."""
        self.pad.copy_(pad)  # in place: a compiled step holding this tensor sees the new padding
        self.padded = bool(pad.any())

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """long [B, L] rotary positions of the tokens at slots start..stop-1 (padding gets 0)."""
        slots = torch.arange(start, stop, device=self.pad.device)
        return (slots[None] - self.pad[:, None]).clamp(min=0)

    def mask(self, start: int, stop: int) -> torch.Tensor:
        """bool [B, 1, L, stop]: a query sees the real tokens at or before its slot. A padding query
        sees itself, so that no softmax row is empty (its output is never used)."""
        keys = torch.arange(stop, device=self.pad.device)[None, None]
        queries = torch.arange(start, stop, device=self.pad.device)[None, :, None]
        real = keys >= self.pad[:, None, None]
        return ((keys <= queries) & real | (keys == queries))[:, None]

    def attends(self, start: int, stop: int, backend: str) -> list[Attend]:
        """One attend per layer: it stores the new k, v at slots start..stop-1, then attends over the
        layer's slots 0..stop-1."""
        if backend == "eager":
            kernel = functools.partial(_eager, mask=self.mask(start, stop))
        elif not self.padded and (start == 0 or stop - start == 1):
            # Without padding a prefill is plain causal attention (sdpa then skips the masked half) and
            # a single new token sees every slot so far: no mask to build or read.
            kernel = functools.partial(F.scaled_dot_product_attention, is_causal=start == 0, enable_gqa=True)
        else:
            kernel = functools.partial(F.scaled_dot_product_attention, attn_mask=self.mask(start, stop), enable_gqa=True)

        def attend(q, k, v, layer):
            self.k[layer][:, :, start:stop] = k
            self.v[layer][:, :, start:stop] = v
            return kernel(q, self.k[layer][:, :, :stop], self.v[layer][:, :, :stop])

        return [functools.partial(attend, layer=i) for i in range(len(self.k))]

    def static_attends(self, slot: torch.Tensor) -> list[Attend]:
        """One attend per layer for a single token at slot long [1]: it stores k, v [B, Hkv, 1, D]
        there by index (an in-place index_put, which inductor keeps in place) and attends over every
        slot, masked to the row's real tokens up to `slot`. Shapes never change with the step."""
        keys = torch.arange(self.length, device=self.pad.device)
        mask = ((keys <= slot) & (keys >= self.pad[:, None]))[:, None, None]  # [B, 1, 1, S]

        def attend(q, k, v, layer):
            self.k[layer][:, :, slot] = k
            self.v[layer][:, :, slot] = v
            return F.scaled_dot_product_attention(q, self.k[layer], self.v[layer], attn_mask=mask, enable_gqa=True)

        return [functools.partial(attend, layer=i) for i in range(len(self.k))]
