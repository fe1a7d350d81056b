"""LVM transformer shapes as a dataclass with named presets (LVM's EasyLM configs, plus small ones)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

ATTN_BACKENDS = ("auto", "xformers", "sdpa", "flex", "eager")
C = TypeVar("C", bound="NamedConfig")


class NamedConfig:
    """Named presets and dict round trips for the config dataclasses of every package (LVMConfig,
    VQGANConfig, AIMConfig, VLMConfig). A subclass registers its table once built: `Cls.presets = {...}`."""

    presets: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_name(cls: type[C], name: str, **overrides) -> C:
        if name not in cls.presets:
            kind = cls.__name__.removesuffix("Config")
            raise ValueError(f"unknown {kind} preset {name!r}; valid names: {', '.join(cls.presets)}")
        return dataclasses.replace(cls.presets[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], values: dict) -> C:
        """The config from its fields (a config.json's; its "model_type" key, if any, is not a field)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k != "model_type"}
        if unknown := set(values) - known:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**values)


@dataclass
class LVMConfig(NamedConfig):
    """A LLaMA-style decoder: RMSNorm, RoPE, SwiGLU, no biases, untied embeddings.

    Token ids: 0..codebook_size-1 are image codes, then the specials (BOS, EOS, ..) up to vocab_size.
    `num_kv_heads=None` means as many key/value heads as query heads; fewer gives grouped-query attention.
    """

    name: str = "custom"
    vocab_size: int = 8292
    codebook_size: int = 8192
    hidden_size: int = 1024
    intermediate_size: int = 2688
    num_layers: int = 22
    num_heads: int = 8
    num_kv_heads: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attn_backend: str = "auto"  # auto | xformers | sdpa | flex | eager, see lvm/attention.py

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.vocab_size < self.codebook_size + 2:
            raise ValueError(
                f"vocab_size {self.vocab_size} is smaller than codebook_size {self.codebook_size} + 2: "
                "the vocabulary needs the image codes plus at least BOS and EOS"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend {self.attn_backend!r} is not one of {ATTN_BACKENDS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def bos_id(self) -> int:
        return self.codebook_size

    @property
    def eos_id(self) -> int:
        return self.codebook_size + 1


def _preset(name: str, hidden: int, intermediate: int, layers: int, heads: int, **rest) -> LVMConfig:
    return LVMConfig(
        name=name, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads, **rest
    )


PRESETS: dict[str, LVMConfig] = {
    p.name: p
    for p in (
        # The paper's sizes (vocab 8292 = 8192 codes + 100 specials, 4096 tokens = 16 images).
        _preset("vqlm_100m", 640, 1664, 22, 10),
        _preset("vqlm_300m", 1024, 2688, 22, 8),
        _preset("vqlm_600m", 1536, 4096, 22, 16),
        _preset("vqlm_1b", 2048, 5504, 22, 16),
        _preset("vqlm_3b", 3200, 8640, 26, 32),
        _preset("vqlm_7b", 4096, 11008, 32, 32),
        # CPU demo: pairs with the 512-code `vqgan_demo` tokenizer (64 tokens per image).
        _preset("vqlm_demo", 256, 688, 4, 4, vocab_size=612, codebook_size=512, max_position_embeddings=2048),
        # Tests: the smallest shape that still has several layers and grouped-query attention.
        _preset("vqlm_tiny", 64, 176, 2, 4, num_kv_heads=2, max_position_embeddings=512),
    )
}
LVMConfig.presets = PRESETS
