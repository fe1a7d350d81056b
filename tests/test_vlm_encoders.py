"""Every encoder kind (transformers towers, timm, open_clip, our VQGAN, POINTS' dual) runs through every
connector into the LVM transformer, and a loss back-propagates to the connector."""

import pytest
import torch

from vlm import VLM, VLMConfig, connectors
from vlm.encoders import build_encoder

HF_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
ENCODERS = {
    "clip": {"kind": "hf", "config": dict(model_type="clip_vision_model", image_size=32, patch_size=8, **HF_TOWER)},
    "siglip": {"kind": "hf", "config": dict(model_type="siglip_vision_model", image_size=32, patch_size=8, **HF_TOWER),
               "feature_layer": -1, "select": "full"},
    "internvl": {"kind": "hf", "config": dict(model_type="internvl_vision", image_size=[32, 32], patch_size=[8, 8], **HF_TOWER),
                 "feature_layer": -1},
    "idefics2": {"kind": "hf", "config": dict(model_type="idefics2_vision", image_size=32, patch_size=8, **HF_TOWER),
                 "feature_layer": -1, "select": "full"},
    "timm": {"kind": "timm", "model_name": "vit_tiny_patch16_224",
             "model_kwargs": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)},
    "open_clip": {"kind": "open_clip", "model_name": "ViT-B-32", "model_kwargs": dict(
        embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))},
    "vqgan_features": {"kind": "vqgan", "config": {"name": "vqgan_tiny"}},
    "vqgan_codes": {"kind": "vqgan", "config": {"name": "vqgan_tiny"}, "mode": "codes", "out_dim": 32},
}
CONNECTOR_OPTIONS = {
    "perceiver": dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
                      num_key_value_heads=1),
    "qformer": dict(num_query_tokens=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    "c_abstractor": dict(hidden_size=32, depth=1, num_queries=4),
    "ldpv2": dict(pooled_grid=(2, 2)),
}
LLM = {"kind": "lvm", "config": dict(name="text", vocab_size=96, codebook_size=0, hidden_size=48, intermediate_size=96,
                                     num_layers=1, num_heads=4, max_position_embeddings=256)}
IMAGE_TOKEN = 95


def _encoder_spec(name):
    spec = dict(ENCODERS[name])
    if spec["kind"] == "vqgan":  # the tokenizer's full config, from its preset
        from tokenizer.config import VQGANConfig

        spec["config"] = VQGANConfig.from_name(spec["config"]["name"]).to_dict()
    return spec


@pytest.mark.slow
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_encoder_through_every_connector_into_the_lvm(encoder):
    spec = _encoder_spec(encoder)
    vision = build_encoder(spec)
    pixels = torch.rand(2, 3, 32, 32)
    out = vision(pixels)
    h, w = out.grid
    assert out.features.shape == (2, h * w, vision.out_dim)
    model = VLM(VLMConfig(encoder=spec, llm=LLM, image_token_id=IMAGE_TOKEN))
    for name in connectors.REGISTRY:
        model.connector = connectors.build(name, vision.out_dim, 48, **CONNECTOR_OPTIONS.get(name, {}))
        n = model.num_image_tokens(out.grid)
        text = torch.randint(0, 90, (2, 6))
        ids = torch.cat([text[:, :2], torch.full((2, n), IMAGE_TOKEN), text[:, 2:]], dim=1)
        result = model(input_ids=ids, pixel_values=pixels, labels=ids)
        assert result.logits.shape == (2, ids.shape[1], 96)
        result.loss.backward()
        grads = [p.grad for p in model.connector.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads[:1]), f"{encoder} -> {name}"


def test_feature_layer_and_cls_handling():
    """LLaVA's choice: the penultimate layer's patches (CLS dropped by "default", kept by "full")."""
    spec = ENCODERS["clip"]
    pixels = torch.rand(1, 3, 32, 32)
    default = build_encoder({**spec, "feature_layer": -2})
    full = build_encoder({**spec, "feature_layer": -2, "select": "full"})
    full.load_state_dict(default.state_dict())
    hidden = default.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(default(pixels).features, hidden[:, 1:])
    torch.testing.assert_close(full(pixels).features, hidden)


def test_dual_encoder_averages_with_weights():
    spec = {"kind": "dual", "encoders": [ENCODERS["clip"], ENCODERS["clip"]], "weights": [0.25, 0.75]}
    dual = build_encoder(spec)
    pixels = torch.rand(1, 3, 32, 32)
    expected = 0.25 * dual.general(pixels).features + 0.75 * dual.document(pixels).features
    torch.testing.assert_close(dual(pixels).features, expected)


def test_vqgan_codes_mode_embeds_the_codebook_vectors():
    """DeLVM: the codes are looked up in the frozen codebook, then projected (the only trained part)."""
    vision = build_encoder(_encoder_spec("vqgan_codes"))
    pixels = torch.rand(2, 3, 32, 32)
    codes = vision.vqgan.encode(pixels)
    expected = vision.project(vision.vqgan.quantize.codebook()[codes])
    torch.testing.assert_close(vision(pixels).features, expected)
    assert [n for n, p in vision.named_parameters() if p.requires_grad] == ["project.weight", "project.bias"]


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid kinds: hf, timm"):
        build_encoder({"kind": "resnet"})
    with pytest.raises(ValueError, match="valid: linear, mlp2x_gelu"):
        connectors.build("mlp3x", 8, 8)
    with pytest.raises(ValueError, match="clip_vision_model"):
        build_encoder({"kind": "hf", "config": {"model_type": "vit"}})
