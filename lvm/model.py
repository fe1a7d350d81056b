"""The LVM: a LLaMA decoder over image codes and a few special tokens.

    input_ids [B, L] -> embed_tokens -> num_layers x Block -> norm -> lm_head -> logits [B, L, vocab]
    Block:  x = x + Attention(RMSNorm(x))      rotary positions, causal (block-diagonal when packed)
            x = x + SwiGLU(RMSNorm(x))

Parameter names are those of transformers' LlamaForCausalLM (model.layers.0.self_attn.q_proj.weight,
.., lm_head.weight) and the rotary layout is its rotate_half one, so HF checkpoints, the released LVM
weights among them, load as they are (lvm/hf.py). B batch, L length, C hidden, H heads, D head dim.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lvm import attention, generation
from lvm.config import LVMConfig
from lvm.fused import linear_cross_entropy


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 so bf16 activations keep their scale."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm with a hand-written backward. Autograd through the composite (pow, mean, rsqrt, two
    muls) writes about twice as many full-size temporaries, and on CPU these memory-bound passes cost
    as much as the matmuls of a small model. Saves x and the per-row 1/rms, not the normalised x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square() / x.shape[-1] + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd  # [.., C]
        grad_normed = grad.float() * weight.float()
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
        dot = torch.linalg.vecdot(grad_normed, normed, dim=-1)[..., None] / x.shape[-1]
        grad_x = torch.addcmul(grad_normed, normed, dot, value=-1).mul_(rstd).to(x.dtype)
        grad_weight = (grad.float() * normed.to(x.dtype).float()).flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


class Rotary(nn.Module):
    """Rotary position embeddings, HF Llama layout: each head's dims are split in halves (x1, x2)
    rotated as (x1 cos - x2 sin, x2 cos + x1 sin), frequency theta^(-2i/D) for pair i."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2]; not in checkpoints

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> cos, sin [B, L, 1, D] in fp32 (broadcast over heads); sin carries
        rotate_half's sign, (-sin, sin), so that applying it needs no negation."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, L, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1)[:, :, None], torch.cat((-sin, sin), dim=-1)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, D] rotated by position: x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1).
    The halves swap is one roll and the sign lives in `sin`: three elementwise ops, not five."""
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # (x2, x1)
    return torch.addcmul(x * cos, swapped, sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LVMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, attend: attention.Attend) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim)  # [B, L, H, D]
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim)  # [B, L, Hkv, D]
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim)
        if cos is not None:  # None: positions come from elsewhere (AIM adds sin-cos embeddings to the input)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, L, D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: LVMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LVMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, attend: attention.Attend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LVM(nn.Module):
    def __init__(self, config: LVMConfig):
        super().__init__()
        self.config = config
        # `model.` + names below = the HF LlamaForCausalLM state-dict keys.
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(Block(config) for _ in range(config.num_layers)),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        # A training switch, not part of the config: recompute each block in backward (less memory,
        # ~1/3 more compute, same numbers). LVMModule(activation_checkpointing=True) sets it.
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # LLaMA's init: every matrix N(0, init_std), norms at one (RMSNorm's own default).
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids long [B, L] (or inputs_embeds [B, L, C], as a VLM passes them) -> logits [B, L, vocab].

        Packed rows pass document_ids (int [B, L], -1 on padding) for block-diagonal causal attention
        and position_ids restarting at each document; without them: one causal sequence, positions 0..L-1.
        """
        return self.lm_head(self.hidden_states(input_ids, position_ids, document_ids, inputs_embeds))

    def loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy = F.cross_entropy(forward(..)[:, :-1].float(), targets), without
        the logits [B, L-1, vocab] in memory (lvm.fused.linear_cross_entropy). targets long [B, L-1]:
        the target of positions 0..L-2, ignore_index where there is none."""
        batch, length = input_ids.shape
        if targets.shape != (batch, length - 1):
            raise ValueError(f"targets must be [B, L-1] = {(batch, length - 1)}, got {tuple(targets.shape)}")
        hidden = self.hidden_states(input_ids, position_ids, document_ids)[:, :-1].flatten(0, 1)  # [B * (L-1), C]
        return linear_cross_entropy(hidden, self.lm_head.weight, targets.flatten(), ignore_index)

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states [B, L, C] that forward feeds to lm_head (features for probes)."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, C]
        batch, length = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(length, device=x.device).expand(batch, length)
        attend = attention.build(self.config.attn_backend, document_ids, length, x.device)
        return self._hidden(x, position_ids, [attend] * self.config.num_layers)

    def forward_cached(
        self,
        input_ids: torch.Tensor | None,
        cache: attention.KVCache,
        start: int,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A generation step: input_ids long [B, L] (or inputs_embeds [B, L, C]) go to cache slots
        start..start+L-1; their keys and values are written into `cache` and they attend to everything
        cached so far. -> logits [B, vocab] of the last position only: generation samples from nothing
        else, and with a vocabulary of 8292 the prefill's full logits would cost more than its last layer."""
        return self.lm_head(self.hidden_cached(input_ids, cache, start, inputs_embeds))

    def hidden_cached(
        self,
        input_ids: torch.Tensor | None,
        cache: attention.KVCache,
        start: int,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """forward_cached's final-norm hidden state [B, C] of the last position, before lm_head (another
        head, such as a VLM's image-code head, may read it instead)."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, C]
        stop = start + x.shape[1]
        attends = cache.attends(start, stop, self.config.attn_backend)
        return self._hidden(x, cache.positions(start, stop), attends)[:, -1]

    def _hidden(self, x, position_ids, attends: list[attention.Attend]) -> torch.Tensor:
        """Embeddings x [B, L, C] -> the final-norm hidden states [B, L, C]; attends[i] is layer i's attention."""
        cos, sin = self.rotary(position_ids)
        for layer, attend in zip(self.model.layers, attends, strict=True):
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, attend, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attend)
        return self.model.norm(x)

    def compile_blocks(self) -> None:
        """torch.compile each transformer block in place (regional compilation, as torchtitan does): the
        blocks share one compiled graph, so compiling costs one block's time whatever the depth, and
        forward, loss and generation all run the compiled blocks. Parameter names stay the plain
        model's, so checkpoints do not change."""
        for layer in self.model.layers:
            layer.compile()

    # -- generation: prefill + KV-cache decoding, see lvm/generation.py ------------------------------------
    generate = generation.generate  # model.generate(prompt_ids, max_new_tokens=256, temperature=1.0, ...)

    # -- sizes -------------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; non_embedding leaves out the input embedding table (a lookup, no FLOPs).
        lm_head stays in: it is a matmul like any other layer."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.model.embed_tokens.weight.numel() if non_embedding else total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT:
        6 * non-embedding params (every weight: one multiply-add forward, two backward) plus
        12 * layers * hidden * seq_len for the q k^T and attention-weighted-v products (counted in full,
        as the standard formula does, although causal kernels skip about half)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.num_layers * c.hidden_size * seq_len

    # -- checkpoints (HF LlamaForCausalLM layout; lvm/hf.py) ----------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, **overrides):
        """Load an HF Llama directory (single or sharded safetensors). Weights are cast to `dtype`
        (fp32 by default; "auto" keeps the checkpoint's). `overrides` replace config fields."""
        from lvm.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, **overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that transformers.LlamaForCausalLM loads."""
        from lvm.hf import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_lightning_checkpoint(cls, path: str | os.PathLike, config: LVMConfig | None = None) -> LVM:
        """The model inside a training checkpoint (keys `model.` + ours); config from its hparams if None."""
        from lvm.hf import load_lightning_checkpoint

        return load_lightning_checkpoint(path, config)
