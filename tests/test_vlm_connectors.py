"""vlm.connectors: shapes, token and parameter formulas, gradients, parity with transformers' modules."""

import pytest
import torch

from vlm import connectors

IN, OUT = 16, 32
# Small options per connector (defaults are the papers' sizes, too big for a fast test).
OPTIONS = {
    "linear": {},
    "mlp2x_gelu": {},
    "janus_mlp": dict(depth=3),
    "downsample_mlp": {},
    "pixel_shuffle_mlp": {},
    "perceiver": dict(intermediate_size=40, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=4,
                      resampler_head_dim=8, num_key_value_heads=2),
    "qformer": dict(num_query_tokens=6, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=40),
    "c_abstractor": dict(hidden_size=24, depth=2, num_queries=9),
    "ldpv2": dict(pooled_grid=(2, 3)),
}
# Tokens per image each connector documents, as a function of the grid.
TOKENS = {
    "linear": lambda h, w: h * w,
    "mlp2x_gelu": lambda h, w: h * w,
    "janus_mlp": lambda h, w: h * w,
    "downsample_mlp": lambda h, w: ((h + 1) // 2) * ((w + 1) // 2),
    "pixel_shuffle_mlp": lambda h, w: ((h + 1) // 2) * ((w + 1) // 2),
    "perceiver": lambda h, w: 5,
    "qformer": lambda h, w: 6,
    "c_abstractor": lambda h, w: 9,
    "ldpv2": lambda h, w: 6,
}


def test_registry_covers_the_issue():
    assert set(connectors.REGISTRY) == set(OPTIONS)


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("grid", [(4, 6), (5, 3), (1, 1)])
def test_shape_tokens_params_and_gradients(name, grid):
    model = connectors.build(name, IN, OUT, **OPTIONS[name])
    h, w = grid
    features = torch.randn(2, h * w, IN, requires_grad=True)
    out = model(features, grid)
    assert out.shape == (2, TOKENS[name](h, w), OUT)
    assert model.num_tokens(grid) == TOKENS[name](h, w)
    assert connectors.num_params(model) == model.expected_num_params()
    out.square().mean().backward()
    assert features.grad.abs().sum() > 0
    if h * w == 1:  # softmax over a single patch is constant: cross-attention q/k get no gradient, rightly
        return
    starved = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not starved, f"{name}: no gradient reaches {starved}"


def test_unknown_connector_lists_valid_names():
    with pytest.raises(ValueError, match="valid: linear, mlp2x_gelu.*ldpv2"):
        connectors.build("resampler", IN, OUT)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="15 tokens but grid 4x4 needs 16"):
        connectors.build("mlp2x_gelu", IN, OUT)(torch.randn(1, 15, IN), (4, 4))
    with pytest.raises(ValueError, match="1/k"):
        connectors.build("pixel_shuffle_mlp", IN, OUT, downsample_ratio=0.3)
    with pytest.raises(ValueError, match="unknown activation 'gleu'"):
        connectors.build("mlp2x_gelu", IN, OUT, projector_hidden_act="gleu")
    with pytest.raises(ValueError, match="num_hidden_layer"):
        connectors.build("qformer", IN, OUT, num_hidden_layer=2)
    with pytest.raises(ValueError, match="square num_queries"):
        connectors.build("c_abstractor", IN, OUT, num_queries=10)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        connectors.build("perceiver", IN, OUT, resampler_n_heads=4, num_key_value_heads=3)


def test_fold_concatenates_neighbourhoods_and_zero_pads_odd_grids():
    # A 3x3 grid of scalar features 1..9: padded to 4x4, four 2x2 neighbourhoods, row-major.
    x = torch.arange(1.0, 10.0).view(1, 9, 1)
    folded = connectors.fold(x, (3, 3), 2)
    assert folded[0].tolist() == [[1, 2, 4, 5], [3, 0, 6, 0], [7, 8, 0, 0], [9, 0, 0, 0]]


@pytest.mark.parametrize("name", ["perceiver", "qformer"])
def test_masked_patches_do_not_change_the_tokens(name):
    model = connectors.build(name, IN, OUT, **OPTIONS[name]).eval()
    features, mask = torch.randn(2, 12, IN), torch.ones(2, 12, dtype=torch.long)
    mask[0, 7:] = 0
    changed = features.clone()
    changed[0, 7:] = torch.randn(5, IN)  # only masked patches differ
    with torch.no_grad():
        a, b = model(features, (3, 4), attention_mask=mask), model(changed, (3, 4), attention_mask=mask)
        unmasked = model(changed, (3, 4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], unmasked[0], atol=1e-4)


# ---- parity with transformers: its module built from a tiny config, random weights, loaded by name ----


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.eval()


def _load_strict(ours: torch.nn.Module, theirs: torch.nn.Module) -> torch.nn.Module:
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval()


@pytest.mark.parametrize("act,bias", [("gelu", True), ("silu", False)])
def test_mlp2x_gelu_equals_llava_projector(act, bias):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=IN, num_attention_heads=2),
                         text_config=LlamaConfig(hidden_size=OUT, num_attention_heads=2),
                         projector_hidden_act=act, multimodal_projector_bias=bias)
    theirs = _randomise(LlavaMultiModalProjector(config))
    ours = _load_strict(connectors.build("mlp2x_gelu", IN, OUT, projector_hidden_act=act,
                                         multimodal_projector_bias=bias), theirs)
    features = torch.randn(2, 12, IN)
    with torch.no_grad():
        torch.testing.assert_close(ours(features, (3, 4)), theirs(features), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [(4, 4), (6, 6), (4, 6)])
def test_pixel_shuffle_mlp_equals_internvl(grid):
    from transformers import InternVLConfig
    from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

    text = dict(model_type="qwen2", hidden_size=OUT)
    config = InternVLConfig(vision_config=dict(hidden_size=IN), text_config=text, downsample_ratio=0.5)
    theirs = _randomise(InternVLMultiModalProjector(config))
    ours = _load_strict(connectors.build("pixel_shuffle_mlp", IN, OUT, downsample_ratio=0.5), theirs)
    h, w = grid
    features = torch.randn(2, h * w, IN)
    with torch.no_grad():
        # as InternVLModel.get_image_features: [B, h, w, C] -> pixel_shuffle -> [B, N/4, 4C] -> projector
        shuffled = InternVLModel.pixel_shuffle(None, features.reshape(2, h, w, IN), scale_factor=0.5)
        expected = theirs(shuffled.reshape(2, -1, shuffled.shape[-1]))
        torch.testing.assert_close(ours(features, grid), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_perceiver_equals_idefics2_connector(masked):
    from transformers import Idefics2Config
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    perceiver = dict(resampler_n_latents=5, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=8,
                     num_key_value_heads=2, hidden_act="silu")
    config = Idefics2Config(
        vision_config=dict(hidden_size=IN),
        text_config=dict(model_type="mistral", hidden_size=OUT, intermediate_size=40, hidden_act="silu",
                         rms_norm_eps=1e-5),
        perceiver_config=dict(hidden_size=OUT, rms_norm_eps=1e-5, **perceiver),
    )
    config.perceiver_config._attn_implementation = "eager"  # the reference math, not a fused kernel
    theirs = _randomise(Idefics2Connector(config))
    ours = _load_strict(connectors.build("perceiver", IN, OUT, intermediate_size=40, projection_act="silu",
                                         rms_norm_eps=1e-5, **perceiver), theirs)
    features, mask = torch.randn(2, 12, IN), torch.ones(2, 12, dtype=torch.long)
    if masked:
        mask[0, 5:] = 0
        mask[1, 9:] = 0
    with torch.no_grad():
        expected = theirs(features, attention_mask=mask)
        got = ours(features, (3, 4), attention_mask=mask if masked else None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
