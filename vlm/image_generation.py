"""The VLM's generation side (Janus): the LLM that reads images through the encoder and connector also
writes them, as VQ codes.

    codes [n, T] -> gen_embed -> [n, T, C]     written at the code placeholders (generation["code_token_id"])
    hidden [.., C] -> gen_head -> [.., K]       the next code's logits, K = the VQ codebook size
    codes [B, T] -> gen_tokenizer.decode -> pixels [B, 3, H, W] in [0, 1]    (T = the VQ grid h*w)

`VLMConfig.generation` (None for a VLM that only reads images) holds:
    tokenizer       {"kind": "vqgan", "config": tokenizer.VQGANConfig fields} or {"kind": "vqgan", "path": dir}
    embed_dim       width of the code embedding before the aligner (Janus: the VQ embed_dim)
    aligner_depth   layers of the MLP aligner (codes -> LLM width); head_dim: the head's hidden width
    hidden_act      activation of aligner and head
    boi_token_id, eoi_token_id, code_token_id, bos_token_id, pad_token_id   (code_token_id: the input id
                    at every position where an image is written as codes; bos / pad: see generate_images)
    family_generation_config   a transformers family's generation_config.json, written back on save

generate_images is Janus's classifier-free guidance: the conditional rows and the unconditional rows (every
prompt token but BOS and begin-of-image replaced by pad, so they see no caption and no image) run in one
batch through one KV cache; each step's logits = uncond + scale * (cond - uncond), and the chosen code is
fed to both rows through gen_embed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from lvm.generation import _check_sampling, sample
from vlm.connectors import DeepMLP, _act
from vlm.generation import _left_align

if TYPE_CHECKING:
    from vlm.model import VLM

DEFAULTS = {"aligner_depth": 2, "head_dim": None, "hidden_act": "gelu", "eoi_token_id": None, "code_token_id": None,
            "bos_token_id": None, "pad_token_id": None, "family_generation_config": None}
REQUIRED = ("tokenizer", "embed_dim", "boi_token_id")

NO_GENERATION_SIDE = (
    "this VLM has no generation side (config.generation is None), so it cannot write images: load a checkpoint "
    "that has one (a transformers Janus directory, or a model trained with configs/unified), or build the VLM "
    "with VLMConfig(generation={...}) as described in vlm/image_generation.py"
)


def check_spec(spec: dict) -> dict:
    """The generation spec with its defaults filled in; a clear error for missing or unknown keys."""
    if missing := [k for k in REQUIRED if k not in spec]:
        raise ValueError(f"the generation spec lacks {missing}; it needs {list(REQUIRED)} (see vlm/image_generation.py)")
    if unknown := set(spec) - set(REQUIRED) - set(DEFAULTS):
        raise ValueError(f"unknown generation spec keys {sorted(unknown)}; known: {sorted([*REQUIRED, *DEFAULTS])}")
    return {**DEFAULTS, **spec}


class GenEmbed(nn.Module):
    """codes long [n, T] -> [n, T, C]: a codebook-size embedding, then the MLP aligner to the LLM's width
    (Janus's generation_embeddings + generation_aligner)."""

    def __init__(self, codebook_size: int, embed_dim: int, out_dim: int, depth: int = 2, hidden_act: str = "gelu"):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.aligner = DeepMLP(embed_dim, out_dim, depth, hidden_act)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.aligner(self.embedding(codes))


class GenHead(nn.Module):
    """hidden [.., C] -> code logits [.., K]: proj_out -> act -> vision_head (Janus's JanusVQVAEHead)."""

    def __init__(self, in_dim: int, hidden_dim: int, codebook_size: int, hidden_act: str = "gelu"):
        super().__init__()
        self.proj_out = nn.Linear(in_dim, hidden_dim)
        self.act = _act(hidden_act)
        self.vision_head = nn.Linear(hidden_dim, codebook_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.act(self.proj_out(hidden)))


def build(spec: dict, llm_width: int) -> tuple[dict, nn.Module, GenEmbed, GenHead]:
    """-> (the spec, its tokenizer given as a config so the VLM's own files hold it, VQ model, gen_embed, gen_head)."""
    from tokenizer import VQGAN
    from tokenizer.config import VQGANConfig

    spec = check_spec(spec)
    options = dict(spec["tokenizer"])
    if options.get("kind") != "vqgan":
        raise ValueError(f"unknown generation tokenizer kind {options.get('kind')!r}; valid: 'vqgan' (tokenizer.VQGAN)")
    if "path" in options:
        vq = VQGAN.from_pretrained(options["path"])
    else:
        vq = VQGAN(VQGANConfig.from_dict(options["config"]))
    vq.eval().requires_grad_(False)  # frozen, as Janus's VQ model: codes are targets and outputs, never trained through
    spec["tokenizer"] = {"kind": "vqgan", "config": vq.config.to_dict()}
    codebook = vq.config.codebook_size
    embed = GenEmbed(codebook, spec["embed_dim"], llm_width, spec["aligner_depth"], spec["hidden_act"])
    head = GenHead(llm_width, spec["head_dim"] or llm_width, codebook, spec["hidden_act"])
    return spec, vq, embed, head


# -- training forward: codes in, code logits out ------------------------------------------------------
def splice_codes(model: VLM, embeds: torch.Tensor, input_ids: torch.Tensor, image_codes: torch.Tensor | None) -> torch.Tensor:
    """embeds [B, L, C] with gen_embed(image_codes) written at the code placeholders, images in reading order."""
    spec = model.config.generation
    code_id = None if spec is None else spec["code_token_id"]
    positions = torch.zeros_like(input_ids, dtype=torch.bool) if code_id is None else input_ids == code_id
    if image_codes is None:
        if positions.any():
            raise ValueError(f"input_ids hold {int(positions.sum())} image-code positions (id {code_id}) but no "
                             "image_codes were given")
        return embeds
    if spec is None:
        raise ValueError(NO_GENERATION_SIDE)
    if code_id is None:
        raise ValueError("image_codes were given but the generation spec names no code_token_id: set "
                         "config.generation['code_token_id'] to the id that marks the positions of written images")
    if image_codes.dim() != 2 or image_codes.shape[1] != model.codes_per_image:
        raise ValueError(f"image_codes must be [n_images, {model.codes_per_image}] (the VQ grid), got "
                         f"{tuple(image_codes.shape)}")
    per_sample = positions.sum(dim=1)
    for sample_index, count in enumerate(per_sample.tolist()):
        if count % model.codes_per_image:
            raise ValueError(f"image code count mismatch in sample {sample_index}: its text has {count} code positions, "
                             f"not a multiple of the {model.codes_per_image} codes of one image")
    if int(per_sample.sum()) != image_codes.numel():
        raise ValueError(f"{image_codes.shape[0]} images of codes were given but the text's code positions take "
                         f"{int(per_sample.sum()) // model.codes_per_image}")
    if positions[:, 0].any():
        raise ValueError("an image's codes start a row: put the begin-of-image token before them (it predicts the first code)")
    written = model.gen_embed(image_codes).flatten(0, 1)  # [n * T, C]
    return embeds.masked_scatter(positions[..., None], written.to(embeds.dtype))


def image_logits(model: VLM, hidden: torch.Tensor, input_ids: torch.Tensor, n_written: int) -> torch.Tensor:
    """hidden [B, L, C] -> logits [n_written, T, K] of each code, read at the position before it (the
    first code from the begin-of-image position), as generation predicts them."""
    positions = input_ids == model.config.generation["code_token_id"]
    before = torch.zeros_like(positions)
    before[:, :-1] = positions[:, 1:]
    codebook = model.gen_tokenizer.config.codebook_size
    return model.gen_head(hidden[before]).view(n_written, model.codes_per_image, codebook)


# -- generation ---------------------------------------------------------------------------------------
def unconditional_ids(input_ids: torch.Tensor, spec: dict) -> torch.Tensor:
    """Janus's unconditional prompt: every id but BOS and begin-of-image replaced by pad."""
    keep = input_ids == spec["boi_token_id"]
    if spec["bos_token_id"] is not None:
        keep |= input_ids == spec["bos_token_id"]
    return input_ids.masked_fill(~keep, spec["pad_token_id"])


@torch.inference_mode()
def generate_images(
    model: VLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    guidance_scale: float = 5.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Prompts [B, L] (left- or right-padded with attention_mask), each ending with begin-of-image -> codes
    long [B, T]. pixel_values feed the prompts' <image> placeholders (conditional rows only). temperature 0
    is greedy; callback(step, codes [B]) streams."""
    spec = model.config.generation
    if spec is None:
        raise ValueError(NO_GENERATION_SIDE)
    _check_sampling(1, temperature, top_k, top_p)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_prompts(input_ids, attention_mask, spec)
    was_training = model.training
    model.eval()
    try:
        cond = model.embed_inputs(input_ids, pixel_values, pixel_attention_mask)  # [B, L, C]
        uncond = model.llm.embed(unconditional_ids(input_ids, spec))
        embeds, pad = _left_align(torch.cat([cond, uncond]), attention_mask.bool().repeat(2, 1))  # [2B, L, C]
        batch, length, total = input_ids.shape[0], embeds.shape[1], model.codes_per_image
        cache = model.llm.new_cache(pad, length + total)
        hidden = model.llm.step_hidden(embeds, cache, 0)  # [2B, C]
        allowed = torch.ones(model.gen_tokenizer.config.codebook_size, dtype=torch.bool, device=embeds.device)
        codes = torch.zeros(batch, total, dtype=torch.long, device=embeds.device)
        for step in range(total):
            if step:
                both = codes[:, step - 1 : step].repeat(2, 1)  # [2B, 1]: the chosen code goes into both rows
                hidden = model.llm.step_hidden(model.gen_embed(both), cache, length + step - 1)
            conditional, unconditional = model.gen_head(hidden).float().chunk(2)
            logits = unconditional + guidance_scale * (conditional - unconditional)
            codes[:, step] = sample(logits, allowed, temperature, top_k, top_p, generator)
            if callback is not None:
                callback(step, codes[:, step])
    finally:
        model.train(was_training)
    return codes


def _check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, spec: dict) -> None:
    boi, pad = spec["boi_token_id"], spec["pad_token_id"]
    if boi is None or pad is None:
        raise ValueError(f"the generation spec needs boi_token_id and pad_token_id to generate (got {boi}, {pad}); "
                         "a transformers Janus directory names them in generation_config.json")
    slots = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask.bool() * (slots + 1)).argmax(dim=1)  # each row's last real slot
    ends = input_ids.gather(1, last[:, None])[:, 0]
    if bad := (ends != boi).nonzero().flatten().tolist():
        raise ValueError(f"prompt rows {bad} do not end with the begin-of-image token (id {boi}); append it: the "
                         "image's codes follow it")
