"""Connectors: vision features [B, N, C_in] on a patch grid (h, w) -> image tokens [B, n, out_dim].

    from vlm import connectors
    proj = connectors.build("pixel_shuffle_mlp", in_dim=1024, out_dim=4096)
    tokens = proj(features, grid=(32, 32))          # [B, 256, 4096]; proj.num_tokens((32, 32)) == 256

Every connector has `forward(features, grid)`, `num_tokens(grid)` (tokens per image) and
`expected_num_params()` (its documented parameter-count formula; tests check it against the module).
The four that load a transformers family by parameter name are exact ports of that family's math:
`mlp2x_gelu` = LlavaMultiModalProjector, `pixel_shuffle_mlp` = InternVLModel.pixel_shuffle followed by
InternVLMultiModalProjector, `perceiver` = Idefics2Connector, `janus_mlp` = JanusVisionAlignerMLP.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.activations import ACT2FN

from lvm.model import RMSNorm


def _act(name: str) -> nn.Module:
    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACT2FN)}")
    return ACT2FN[name]


def _grid_map(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, C] with N == h*w (row-major) -> [B, h, w, C]; a clear error when N and the grid disagree."""
    h, w = grid
    if features.shape[1] != h * w:
        raise ValueError(
            f"features have {features.shape[1]} tokens but grid {h}x{w} needs {h * w}; "
            "pass the encoder's (h, w) patch grid, with any CLS token dropped"
        )
    return features.view(features.shape[0], h, w, features.shape[2])


def fold(features: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """Concatenate each factor x factor neighbourhood into channels: [B, h*w, C] -> [B, h'*w', f*f*C],
    h' = ceil(h/f), w' = ceil(w/f), tokens row-major. Odd grids are zero-padded at the bottom/right (as
    VILA's flat_square). Channel order (row offset, column offset, C) is the order transformers'
    InternVLModel.pixel_shuffle (and VILA's current flat_square) produce, so their weights apply."""
    x = _grid_map(features, grid)  # [B, h, w, C]
    B, h, w, C = x.shape
    x = F.pad(x, (0, 0, 0, (-w) % factor, 0, (-h) % factor))  # [B, H, W, C], H and W multiples of f
    H, W = x.shape[1] // factor, x.shape[2] // factor
    x = x.view(B, H, factor, W, factor, C).permute(0, 1, 3, 2, 4, 5)  # [B, H', W', f_row, f_col, C]
    return x.reshape(B, H * W, factor * factor * C)


class Linear(nn.Module):
    """One linear map per token. Tokens: h*w. Params: in*out + out*bias."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.linear(_grid_map(features, grid).flatten(1, 2))  # [B, h*w, out]

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def expected_num_params(self) -> int:
        i, o = self.linear.in_features, self.linear.out_features
        return i * o + o * (self.linear.bias is not None)


class MLP2xGelu(nn.Module):
    """LLaVA-1.5's projector: Linear(in, out) -> act -> Linear(out, out), per token.
    Names linear_1 / linear_2 as LlavaMultiModalProjector; options as LlavaConfig
    (projector_hidden_act, multimodal_projector_bias). Tokens: h*w. Params: in*out + out*out + 2*out*bias."""

    def __init__(self, in_dim: int, out_dim: int, projector_hidden_act: str = "gelu",
                 multimodal_projector_bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=multimodal_projector_bias)
        self.act = _act(projector_hidden_act)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=multimodal_projector_bias)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = _grid_map(features, grid).flatten(1, 2)  # [B, h*w, in]
        return self.linear_2(self.act(self.linear_1(x)))  # [B, h*w, out]

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def expected_num_params(self) -> int:
        i, o, bias = self.linear_1.in_features, self.linear_1.out_features, self.linear_1.bias is not None
        return i * o + o * o + 2 * o * bias


class DeepMLP(nn.Module):
    """Janus's aligners (JanusVisionAlignerMLP; JanusVQVAEAlignerMLP, which also feeds generated codes in):
    Linear(in, out), then depth-1 times act -> Linear(out, out), per token; names fc1 / hidden_layers.i as
    transformers. Tokens: h*w. Params: in*out + out + (depth-1)*(out*out + out)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden_act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.hidden_layers = nn.ModuleList(nn.Linear(out_dim, out_dim) for _ in range(1, depth))
        self.act = _act(hidden_act)

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.fc1(features if grid is None else _grid_map(features, grid).flatten(1, 2))  # [B, N, out]
        for layer in self.hidden_layers:
            x = layer(self.act(x))
        return x

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def expected_num_params(self) -> int:
        i, o = self.fc1.in_features, self.fc1.out_features
        return i * o + o + len(self.hidden_layers) * (o * o + o)


class FoldMLP(nn.Module):
    """Fold f x f neighbourhoods into channels (`fold`), then LayerNorm(f*f*in) -> Linear -> act -> Linear.
    Names layer_norm / linear_1 / linear_2 as InternVLMultiModalProjector (VILA's mlp_downsample is the
    same math with f=2, its layers.1 / layers.2 / layers.4 are our layer_norm / linear_1 / linear_2).
    Tokens: ceil(h/f) * ceil(w/f). Params: 2*(f*f*in) + (f*f*in)*out + out + out*out + out."""

    def __init__(self, in_dim: int, out_dim: int, factor: int, projector_hidden_act: str = "gelu"):
        super().__init__()
        self.factor = factor
        self.layer_norm = nn.LayerNorm(in_dim * factor * factor)
        self.linear_1 = nn.Linear(in_dim * factor * factor, out_dim)
        self.act = _act(projector_hidden_act)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.layer_norm(fold(features, grid, self.factor))  # [B, h'*w', f*f*in]
        return self.linear_2(self.act(self.linear_1(x)))  # [B, h'*w', out]

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return math.ceil(grid[0] / self.factor) * math.ceil(grid[1] / self.factor)

    def expected_num_params(self) -> int:
        folded, o = self.linear_1.in_features, self.linear_1.out_features
        return 2 * folded + folded * o + o + o * o + o


def downsample_mlp(in_dim: int, out_dim: int, projector_hidden_act: str = "gelu") -> FoldMLP:
    """VILA's mlp_downsample: each 2x2 neighbourhood concatenated (odd grids zero-padded), LayerNorm, MLP."""
    return FoldMLP(in_dim, out_dim, factor=2, projector_hidden_act=projector_hidden_act)


def pixel_shuffle_mlp(in_dim: int, out_dim: int, downsample_ratio: float = 0.5,
                      projector_hidden_act: str = "gelu") -> FoldMLP:
    """InternVL / POINTS: pixel shuffle by downsample_ratio (1/ratio must be an integer), LayerNorm, MLP.
    Equal to transformers' pixel_shuffle + InternVLMultiModalProjector on even grids; odd grids (which
    transformers refuses) are zero-padded as VILA does."""
    factor = round(1 / downsample_ratio)
    if downsample_ratio <= 0 or abs(factor * downsample_ratio - 1) > 1e-6:
        raise ValueError(f"downsample_ratio must be 1/k, k an integer (InternVL: 0.5), not {downsample_ratio}")
    return FoldMLP(in_dim, out_dim, factor=factor, projector_hidden_act=projector_hidden_act)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), no biases: Idefics2MLP's math and names."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(in_dim, hidden, bias=False)
        self.up_proj = nn.Linear(in_dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, out_dim, bias=False)
        self.act_fn = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerceiverAttention(nn.Module):
    """Latents attend over concat(context, latents); grouped-query heads (kv head j serves query heads
    j*g .. j*g+g-1, as transformers' repeat_kv)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, n_kv_heads: int):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"resampler_n_heads={n_heads} must be a multiple of "
                             f"num_key_value_heads={n_kv_heads}")
        self.n_heads, self.head_dim, self.n_kv_heads = n_heads, head_dim, n_kv_heads
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None):
        B, L, _ = latents.shape
        both = torch.cat([context, latents], dim=1)  # [B, N+L, D]
        hd = self.head_dim
        q = self.q_proj(latents).view(B, L, self.n_heads, hd).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(both).view(B, -1, self.n_kv_heads, hd).transpose(1, 2)  # [B, KV, N+L, hd]
        v = self.v_proj(both).view(B, -1, self.n_kv_heads, hd).transpose(1, 2)
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, N+L, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, hd], scale hd^-0.5
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, head_dim: int, n_kv_heads: int, act: str, eps: float):
        super().__init__()
        self.input_latents_norm = RMSNorm(dim, eps)
        self.input_context_norm = RMSNorm(dim, eps)
        self.self_attn = PerceiverAttention(dim, n_heads, head_dim, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = GatedMLP(dim, 4 * dim, dim, act)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None):
        attended = self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context), mask)
        latents = latents + attended
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, n_latents: int, depth: int, n_heads: int, head_dim: int, n_kv_heads: int,
                 act: str, eps: float):
        super().__init__()
        # transformers initialises the latents to ones; identical latents get identical gradients and
        # never tell apart, so from scratch we draw them (a loaded checkpoint overwrites them anyway).
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * 0.02)
        self.layers = nn.ModuleList(
            PerceiverLayer(dim, n_heads, head_dim, n_kv_heads, act, eps) for _ in range(depth)
        )
        self.norm = RMSNorm(dim, eps)

    def forward(self, context: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, L = context.shape[0], self.latents.shape[0]
        mask = None
        if attention_mask is not None:  # [B, N] context mask; latents always visible
            keep = torch.cat([attention_mask.bool(), attention_mask.new_ones(B, L, dtype=torch.bool)], 1)
            mask = keep[:, None, None, :]  # [B, 1, 1, N+L]
        latents = self.latents.expand(B, -1, -1)  # [B, L, D]
        for layer in self.layers:
            latents = layer(latents, context, mask)
        return self.norm(latents)


class Perceiver(nn.Module):
    """Idefics2's connector: modality_projection (gated MLP in -> intermediate_size -> out, projection_act),
    then a perceiver resampler of `depth` layers whose learned latents attend over concat(context, latents)
    (GQA, RMSNorm, gated MLP of 4*out with hidden_act), final RMSNorm. Parameter names equal transformers'
    Idefics2Connector state dict. Options are Idefics2's perceiver_config names, plus intermediate_size and
    projection_act (Idefics2 takes them from its text_config).
    Tokens: resampler_n_latents (L), whatever the grid. Params, with D=out, I=intermediate_size, H heads
    of head_dim hd, KV kv-heads: 2*in*I + I*D + L*D + D + depth*(3*D + 2*D*H*hd + 2*D*KV*hd + 12*D*D)."""

    def __init__(self, in_dim: int, out_dim: int, intermediate_size: int | None = None,
                 projection_act: str = "silu", resampler_n_latents: int = 64, resampler_depth: int = 3,
                 resampler_n_heads: int = 16, resampler_head_dim: int = 96, num_key_value_heads: int = 4,
                 hidden_act: str = "silu", rms_norm_eps: float = 1e-6):
        super().__init__()
        self.intermediate_size = intermediate_size or 4 * out_dim
        self.modality_projection = GatedMLP(in_dim, self.intermediate_size, out_dim, projection_act)
        self.perceiver_resampler = PerceiverResampler(
            out_dim, resampler_n_latents, resampler_depth, resampler_n_heads, resampler_head_dim,
            num_key_value_heads, hidden_act, rms_norm_eps)
        self.shape = dict(i=in_dim, d=out_dim, L=resampler_n_latents, depth=resampler_depth,
                          H=resampler_n_heads, hd=resampler_head_dim, kv=num_key_value_heads)

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attention_mask [B, N]: 1 for real patches, 0 for padding (Idefics2's flat patch_attention_mask)."""
        context = self.modality_projection(features)  # [B, N, out]
        return self.perceiver_resampler(context, attention_mask)  # [B, n_latents, out]

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.shape["L"]

    def expected_num_params(self) -> int:
        s, inter = self.shape, self.intermediate_size
        d, hd = s["d"], s["hd"]
        layer = 3 * d + 2 * d * s["H"] * hd + 2 * d * s["kv"] * hd + 3 * d * 4 * d
        return 2 * s["i"] * inter + inter * d + s["L"] * d + d + s["depth"] * layer


class QFormer(nn.Module):
    """BLIP-2: learned query tokens read the features through transformers' Blip2QFormerModel (cross-attention
    every cross_attention_frequency layers), then language_projection to out_dim. Names query_tokens /
    qformer.* / language_projection.* as Blip2ForConditionalGeneration. Options: num_query_tokens and any
    Blip2QFormerConfig field (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, ...);
    encoder_hidden_size is in_dim.
    Tokens: num_query_tokens (Q). Params (H hidden, I intermediate, E=in, n layers, c of them with
    cross-attention): n*(4H^2 + 6H + 2HI + I + 3H) + c*(2H^2 + 2EH + 6H) + 2H + Q*H + H*out + out."""

    def __init__(self, in_dim: int, out_dim: int, num_query_tokens: int = 32, **qformer_options):
        super().__init__()
        unknown = sorted(k for k in qformer_options if not hasattr(Blip2QFormerConfig(), k))
        if unknown:
            raise ValueError(f"unknown Blip2QFormerConfig options {unknown}")
        self.config = Blip2QFormerConfig(**{**qformer_options, "encoder_hidden_size": in_dim})
        hidden = self.config.hidden_size
        std = self.config.initializer_range
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden) * std)
        self.qformer = Blip2QFormerModel(self.config)
        self.language_projection = nn.Linear(hidden, out_dim)

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attention_mask [B, N]: 1 for real patches, 0 for padding."""
        queries = self.query_tokens.expand(features.shape[0], -1, -1)  # [B, Q, H]
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features,
                           encoder_attention_mask=attention_mask).last_hidden_state
        return self.language_projection(out)  # [B, Q, out]

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.query_tokens.shape[1]

    def expected_num_params(self) -> int:
        c = self.config
        H, inter, E, n = c.hidden_size, c.intermediate_size, c.encoder_hidden_size, c.num_hidden_layers
        crossed = len(range(0, n, c.cross_attention_frequency))
        Q, out = self.query_tokens.shape[1], self.language_projection.out_features
        per_layer = 4 * H * H + 6 * H + 2 * H * inter + inter + 3 * H
        return n * per_layer + crossed * (2 * H * H + 2 * E * H + 6 * H) + 2 * H + Q * H + H * out + out


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: `depth` RegNet bottleneck blocks (timm's RegStage: 1x1, depthwise 3x3, SE,
    1x1, residual; LayerNorm2d, SiLU) in -> hidden_size, adaptive average pooling to a sqrt(num_queries)
    square, `depth` blocks more, then an MLP of mlp_depth Linear layers (SiLU between) to out_dim. Names
    net.0 / net.2 / readout.* as Honeybee. Honeybee's optional learned position embedding is left out: it
    fixes the input token count, and here grids vary.
    Tokens: num_queries. Params: blocks(in, hid) + (depth-1)*blocks(hid, hid) twice over, where a block
    (ci -> co, s = round(ci/4)) has ci*co + 2co + 11co + 2*co*s + s + co + co*co + 2co (+ ci*co + 2co
    if ci != co); readout: hid*out + out + (mlp_depth-1)*(out*out + out)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_size: int = 1024, depth: int = 3, mlp_depth: int = 2,
                 num_queries: int = 144):
        super().__init__()
        from timm.layers import LayerNorm2d
        from timm.models.regnet import RegStage

        side = math.isqrt(num_queries)
        if side * side != num_queries or depth < 1 or mlp_depth < 1:
            raise ValueError(f"c_abstractor needs a square num_queries and depth, mlp_depth >= 1; got "
                             f"num_queries={num_queries}, depth={depth}, mlp_depth={mlp_depth}")

        def stage(ci: int, co: int) -> nn.Module:
            return RegStage(depth, ci, co, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)

        self.dims = (in_dim, hidden_size, out_dim, depth, mlp_depth, num_queries)
        self.net = nn.Sequential(
            stage(in_dim, hidden_size), nn.AdaptiveAvgPool2d(side), stage(hidden_size, hidden_size)
        )
        readout = [nn.Linear(hidden_size, out_dim)]
        for _ in range(mlp_depth - 1):
            readout += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
        self.readout = nn.Sequential(*readout)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = _grid_map(features, grid).permute(0, 3, 1, 2)  # [B, in, h, w]
        x = self.net(x)  # [B, hidden, side, side]
        return self.readout(x.flatten(2).transpose(1, 2))  # [B, num_queries, out]

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.dims[5]

    def expected_num_params(self) -> int:
        i, hid, o, depth, mlp_depth, _ = self.dims

        def block(ci: int, co: int) -> int:
            s = round(ci / 4)
            shortcut = (ci * co + 2 * co) * (ci != co)
            return ci * co + 2 * co + 11 * co + 2 * co * s + s + co + co * co + 2 * co + shortcut

        stages = block(i, hid) + block(hid, hid) * (2 * depth - 1)
        return stages + hid * o + o + (mlp_depth - 1) * (o * o + o)


class LDPv2(nn.Module):
    """MobileVLM v2's LDPv2: per-token MLP (Linear, GELU, Linear) in -> out, 2D adaptive average pooling of
    the grid to pooled_grid, then a depthwise 3x3 conv as positional encoding added back (residual).
    Names mlp.0 / mlp.2 / peg (MobileVLM's mlp.mlp.* / peg.peg.0.*).
    Tokens: pooled_grid[0] * pooled_grid[1]. Params: in*out + out + out*out + out + 9*out + out."""

    def __init__(self, in_dim: int, out_dim: int, pooled_grid: tuple[int, int] = (12, 12)):
        super().__init__()
        self.pooled_grid = tuple(pooled_grid)
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.pool = nn.AdaptiveAvgPool2d(self.pooled_grid)
        self.peg = nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.mlp(_grid_map(features, grid))  # [B, h, w, out]
        x = self.pool(x.permute(0, 3, 1, 2))  # [B, out, ph, pw]
        x = x + self.peg(x)
        return x.flatten(2).transpose(1, 2)  # [B, ph*pw, out]

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.pooled_grid[0] * self.pooled_grid[1]

    def expected_num_params(self) -> int:
        i, o = self.mlp[0].in_features, self.mlp[0].out_features
        return i * o + o + o * o + o + 9 * o + o


REGISTRY = {
    "linear": Linear,
    "mlp2x_gelu": MLP2xGelu,
    "janus_mlp": DeepMLP,
    "downsample_mlp": downsample_mlp,
    "pixel_shuffle_mlp": pixel_shuffle_mlp,
    "perceiver": Perceiver,
    "qformer": QFormer,
    "c_abstractor": CAbstractor,
    "ldpv2": LDPv2,
}


def build(name: str, in_dim: int, out_dim: int, **options) -> nn.Module:
    """The connector `name` mapping in_dim features to out_dim tokens; options are the connector's own."""
    if name not in REGISTRY:
        raise ValueError(f"unknown connector {name!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name](in_dim, out_dim, **options)


def num_params(module: nn.Module) -> int:
    """Parameters a connector holds (what expected_num_params() documents)."""
    return sum(p.numel() for p in module.parameters())
