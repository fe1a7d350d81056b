"""transformers VLM families <-> our pipeline: config.json mapping and weight renaming, both ways.

A family's checkpoint holds `model.<tower>.*`, `model.<projector>.*`, `model.<text model>.*` and
`lm_head.weight` (transformers 5 layout). Ours holds `encoder.tower.*`, `connector.*` and `llm.model.*`
(the LLM's own causal-LM names: `model.*` + `lm_head.weight`, for our LVM and for transformers' LMs
alike), so renaming is a prefix swap. A Llama text model runs on our LVM transformer; other text models
(Qwen2 in InternVL, Mistral in Idefics2) as transformers causal LMs.

Janus also writes images: its VQ model loads into our tokenizer.VQGAN (the same taming blocks; transformers
lists the decoder's `up` blocks from the lowest resolution, taming from the highest, so their indices are
reversed), its generation embedding, aligner and head into the VLM's generation side (vlm/image_generation.py),
and its begin-of-image id comes from generation_config.json (`generation_kwargs`), written back on save.
"""

from __future__ import annotations

import torch

# model_type -> (tower, projector, text model) attribute names in transformers, and our connector
FAMILIES = {
    "llava": ("vision_tower", "multi_modal_projector", "language_model", "mlp2x_gelu"),
    "internvl": ("vision_tower", "multi_modal_projector", "language_model", "pixel_shuffle_mlp"),
    "idefics2": ("vision_model", "connector", "text_model", "perceiver"),
    "janus": ("vision_model", "aligner", "language_model", "janus_mlp"),
}
# Janus's generation side: (theirs, ours)
JANUS_GENERATION = [
    ("model.vqmodel.", "gen_tokenizer."),
    ("model.generation_embeddings.", "gen_embed.embedding."),
    ("model.generation_aligner.", "gen_embed.aligner."),
    ("model.generation_head.", "gen_head."),
]


def _prefixes(family: str) -> list[tuple[str, str]]:
    """(theirs, ours) prefix pairs; for each part the layout transformers writes comes first (LLaVA and
    InternVL are still written in their 4.x layout, `language_model.model.*`, for older readers), then
    the other layout, which loads too."""
    tower, projector, text = FAMILIES[family][:3]
    legacy = [
        (f"{tower}.", "encoder.tower."),
        (f"{projector}.", "connector."),
        (f"{text}.model.", "llm.model.model."),
        (f"{text}.lm_head.", "llm.model.lm_head."),
    ]
    current = [
        (f"model.{tower}.", "encoder.tower."),
        (f"model.{projector}.", "connector."),
        (f"model.{text}.", "llm.model.model."),
        ("lm_head.", "llm.model.lm_head."),
    ]
    if family == "janus":
        return current + JANUS_GENERATION
    return legacy + current if family in ("llava", "internvl") else current


def _rename(state: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            out[key] = value  # left as is: the shape check then names it as unexpected
    return out


def _reverse_up_blocks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VQ decoder's up.{i} <-> up.{n-1-i} (transformers' Janus order <-> taming's; its own inverse)."""
    prefix = "gen_tokenizer.decoder.up."
    levels = 1 + max((int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)), default=-1)
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            key = f"{prefix}{levels - 1 - int(index)}.{rest}"
        out[key] = value
    return out


def state_from_hf(family: str, state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    ours = _rename(state, _prefixes(family))
    if family == "janus":
        ours = _reverse_up_blocks(ours)
    if "llm.model.lm_head.weight" not in ours and _tied(config.family_config):
        ours["llm.model.lm_head.weight"] = ours["llm.model.model.embed_tokens.weight"]
    return ours


def state_to_hf(family: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> the layout transformers writes for the family (the first pair for each of ours)."""
    first: dict[str, str] = {}
    for old, new in _prefixes(family):
        first.setdefault(new, old)
    if family == "janus":
        state = _reverse_up_blocks(state)
    return _rename(state, [(new, old) for new, old in first.items()])


def _tied(hf: dict) -> bool:
    text = hf.get("text_config") or {}
    default = hf["model_type"] == "janus"  # JanusConfig ties by default, the others do not
    return bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", default)))


def config_from_hf(hf: dict, generation_config: dict | None = None):
    """Our VLMConfig for a family's config.json (and, for Janus, its generation_config.json)."""
    from vlm.model import VLMConfig

    family, family_config, generation = hf["model_type"], hf, None
    if family == "janus":  # transformers' defaults filled in (and vq_config.num_patches derived) by JanusConfig
        import transformers

        hf = transformers.JanusConfig.from_dict(hf).to_dict()
        generation = _janus_generation(hf, generation_config or {})
    vision, text = dict(hf["vision_config"]), dict(hf["text_config"])
    connector = FAMILIES[family][3]
    if family == "llava":
        layer = hf.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"LLaVA with several vision feature layers {layer} is not supported; one layer only")
        encoder = {"kind": "hf", "config": vision, "feature_layer": layer,
                   "select": hf.get("vision_feature_select_strategy", "default")}
        options = {"projector_hidden_act": hf.get("projector_hidden_act", "gelu"),
                   "multimodal_projector_bias": hf.get("multimodal_projector_bias", True)}
    elif family == "internvl":
        encoder = {"kind": "hf", "config": vision, "feature_layer": hf.get("vision_feature_layer", -1),
                   "select": hf.get("vision_feature_select_strategy", "default")}
        options = {"downsample_ratio": hf.get("downsample_ratio", 0.5),
                   "projector_hidden_act": hf.get("projector_hidden_act", "gelu")}
    elif family == "janus":  # the tower's last hidden state (after its post-layernorm), every patch: no CLS
        encoder = {"kind": "hf", "config": vision, "feature_layer": -1, "select": "full"}
        options = {"depth": vision["depth"], "hidden_act": vision["hidden_act"]}
    else:  # idefics2: the tower's last hidden state, every patch (no CLS); the perceiver's own config
        encoder = {"kind": "hf", "config": vision, "feature_layer": -1, "select": "full"}
        perceiver = hf["perceiver_config"]
        options = {k: perceiver[k] for k in ("resampler_n_latents", "resampler_depth", "resampler_n_heads",
                                             "resampler_head_dim", "num_key_value_heads", "hidden_act", "rms_norm_eps")
                   if k in perceiver}
        options |= {"intermediate_size": text["intermediate_size"], "projection_act": text.get("hidden_act", "silu")}
    image_token_id = hf.get("image_token_id", hf.get("image_token_index"))
    return VLMConfig(
        encoder=encoder,
        llm=_llm_spec(text, tied=_tied(hf)),
        image_token_id=image_token_id,
        connector=connector,
        connector_options=options,
        eos_token_id=text.get("eos_token_id", hf.get("eos_token_id")),
        pad_token_id=text.get("pad_token_id", hf.get("pad_token_id")),
        family=family,
        family_config=family_config,
        generation=generation,
    )


def _janus_generation(hf: dict, generation_config: dict) -> dict:
    """Our generation spec for a Janus config: its VQ model as a tokenizer.VQGAN config (attention at the
    lowest resolution, as JanusVQVAE; codebook L2-normalised, as its lookup), the generation MLPs' shapes."""
    vq, text = hf["vq_config"], hf["text_config"]
    if vq["double_latent"] or vq["out_channels"] != vq["in_channels"]:
        raise ValueError("a Janus VQ model with double_latent or out_channels != in_channels does not fit "
                         "tokenizer.VQGAN (taming's layout)")
    side, levels = vq["num_patches"], len(vq["channel_multiplier"])
    if hf["vision_config"]["num_image_tokens"] != side * side:
        raise ValueError(f"vision_config.num_image_tokens {hf['vision_config']['num_image_tokens']} is not the VQ "
                         f"grid {side}x{side} (vq_config.num_patches): Janus generates one code per grid cell")
    tokenizer = dict(
        name="janus_vq", resolution=side * 2 ** (levels - 1), in_channels=vq["in_channels"],
        base_channels=vq["base_channels"], channel_mult=list(vq["channel_multiplier"]),
        num_res_blocks=vq["num_res_blocks"], attn_resolutions=[side], mid_attention=True,
        z_channels=vq["latent_channels"], embed_dim=vq["embed_dim"], codebook_size=vq["num_embeddings"],
        dropout=vq["dropout"], pixel_range=[-1.0, 1.0], l2_normalized_codes=True,
        extra={"source": "transformers janus_vqgan"},
    )  # fmt: skip
    return {
        "tokenizer": {"kind": "vqgan", "config": tokenizer},
        "embed_dim": vq["embed_dim"],
        "aligner_depth": vq["num_hidden_layers"],
        "head_dim": vq["projection_dim"],
        "hidden_act": vq["hidden_act"],
        "boi_token_id": (generation_config.get("generation_kwargs") or {}).get("boi_token_id"),
        "bos_token_id": generation_config.get("bos_token_id", text.get("bos_token_id")),
        "pad_token_id": generation_config.get("pad_token_id", text.get("pad_token_id")),
        "family_generation_config": generation_config or None,
    }


def _llm_spec(text: dict, tied: bool) -> dict:
    """Llama text models run on our LVM transformer (same weights and names); the rest on transformers."""
    from lvm.hf import config_from_hf as lvm_config_from_hf

    if text.get("model_type") == "llama" and not tied:
        try:
            return {"kind": "lvm", "config": lvm_config_from_hf(text).to_dict()}
        except ValueError:  # a Llama variant our transformer does not implement (biases, rope scaling, ..)
            pass
    return {"kind": "hf", "config": {**text, "tie_word_embeddings": tied}}
