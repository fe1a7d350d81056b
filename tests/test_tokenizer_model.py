"""tokenizer.model.VQGAN: presets, the [0, 1] encode/decode API, its input checks, save/load, and the
quantizer options (l2-normalised codes, dead-code restart)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tokenizer import PRESETS, VQGAN, VQGANConfig

SMALL = ["vqgan_tiny", "vqgan_demo"]
LARGE = {  # name: (codebook size, embed dim, z channels, top channel width)
    "vqgan_f16_8192": (8192, 64, 64, 768),
    "vqgan_imagenet_f16_1024": (1024, 256, 256, 512),
    "vqgan_imagenet_f16_16384": (16384, 256, 256, 512),
}


def test_every_preset_is_covered_here():
    assert set(PRESETS) == set(SMALL) | set(LARGE)


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_small_presets_round_trip_shapes(name):
    model = VQGAN.from_name(name).eval()
    config = model.config
    assert config.name == name
    side = config.resolution
    images = torch.rand(2, 3, side, side)
    codes = model.encode(images)
    assert codes.dtype == torch.long
    assert codes.shape == (2, config.tokens_per_image) == (2, (side // config.downsample_factor) ** 2)
    assert 0 <= int(codes.min()) and int(codes.max()) < config.codebook_size
    decoded = model.decode(codes)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    assert not codes.is_inference() and not decoded.is_inference()


def test_small_preset_token_counts():
    assert VQGANConfig.from_name("vqgan_tiny").tokens_per_image == 256  # 32x32, f2
    demo = VQGANConfig.from_name("vqgan_demo")
    assert (demo.downsample_factor, demo.tokens_per_image) == (4, 64)  # 32x32, f4
    assert demo.l2_normalized_codes and demo.dead_code_threshold == 0  # restarts split flat regions' codes


@pytest.mark.parametrize("name", sorted(LARGE))
def test_large_presets_on_meta_device(name):
    codebook_size, embed_dim, z_channels, top_width = LARGE[name]
    with torch.device("meta"):
        model = VQGAN.from_name(name)
        pixels = torch.empty(1, 3, 256, 256)
        latents = model.quant_conv(model.encoder(pixels))  # shapes only: meta tensors carry no data
        reconstruction = model.decoder(model.post_quant_conv(latents))
    config = model.config
    assert config.resolution == 256 and config.downsample_factor == 16
    assert config.latent_size == 16 and config.tokens_per_image == 256
    assert latents.shape == (1, embed_dim, 16, 16)
    assert reconstruction.shape == (1, 3, 256, 256)
    assert model.quantize.embedding.weight.shape == (codebook_size, embed_dim)
    assert model.quant_conv.weight.shape == (embed_dim, z_channels, 1, 1)
    assert model.encoder.conv_out.weight.shape == (z_channels, top_width, 3, 3)
    assert model.decoder.conv_in.weight.shape == (top_width, z_channels, 3, 3)
    assert model.encoder.conv_in.weight.shape == (128, 3, 3, 3)
    assert model.decoder.conv_out.weight.shape == (3, 128, 3, 3)
    has_attention = any(".attn" in k for k in model.state_dict())
    assert has_attention == (
        name != "vqgan_f16_8192"
    )  # the LVM tokenizer has none, taming's ImageNet ones do
    if has_attention:
        assert "encoder.mid.attn_1.q.weight" in model.state_dict()
        assert "encoder.down.4.attn.1.proj_out.weight" in model.state_dict()  # attention at 16x16
        assert not any(k.startswith("encoder.down.3.attn") for k in model.state_dict())


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as info:
        VQGAN.from_name("vqgan_huge")
    message = str(info.value)
    assert "'vqgan_huge'" in message
    for name in PRESETS:
        assert name in message


def test_preset_overrides_apply():
    model = VQGAN.from_name("vqgan_tiny", codebook_size=32)
    assert model.quantize.embedding.weight.shape == (32, 8)
    assert PRESETS["vqgan_tiny"].codebook_size == 64  # the preset itself is untouched


@pytest.fixture(scope="module")
def tiny() -> VQGAN:
    torch.manual_seed(0)
    model = VQGAN.from_name("vqgan_tiny").eval()
    with torch.no_grad():  # a codebook spread like the latents, so that many codes are used
        latents = model.quant_conv(model.encoder(torch.rand(2, 3, 8, 8) * 2 - 1))
        mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
        model.quantize.embedding.weight.copy_(mean + std * torch.randn_like(model.quantize.embedding.weight))
    return model


def test_encode_is_row_major_nearest_code(tiny):
    images = torch.rand(2, 3, 8, 12)  # not square, so rows and columns cannot be confused
    codes = tiny.encode(images)
    assert codes.shape == (2, 4 * 6)
    with torch.no_grad():
        z = tiny.quant_conv(tiny.encoder(images * 2 - 1))  # vqgan_tiny works on [-1, 1] pixels
    assert z.shape == (2, 8, 4, 6)
    codebook = tiny.quantize.embedding.weight
    for b in range(2):
        for row in range(4):
            for col in range(6):
                distances = (z[b, :, row, col] - codebook).pow(2).sum(dim=1)
                assert codes[b, row * 6 + col] == distances.argmin()
    assert codes.unique().numel() > 8


def test_decode_uses_codebook_rows(tiny):
    codes = torch.randint(0, 64, (2, 4 * 6))
    decoded = tiny.decode(codes, latent_hw=(4, 6))
    assert decoded.shape == (2, 3, 8, 12)
    vectors = tiny.quantize.embedding.weight[codes].view(2, 4, 6, 8).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = ((tiny.decoder(tiny.post_quant_conv(vectors)) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=0)
    # a square grid needs no latent_hw
    assert tiny.decode(codes[:, :16]).shape == (2, 3, 8, 8)


def test_training_forward_matches_encode(tiny):
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        reconstruction, loss, codes = tiny(images * 2 - 1)
    assert torch.equal(codes, tiny.encode(images))
    assert reconstruction.shape == images.shape and loss.ndim == 0 and float(loss) > 0


@pytest.mark.parametrize(
    ("images", "error", "received"),
    [
        (torch.full((1, 3, 16, 16), -0.5), ValueError, "[-0.500, -0.500]"),
        (torch.full((1, 3, 16, 16), 255.0), ValueError, "[255.000, 255.000]"),
        (torch.rand(1, 1, 16, 16), ValueError, "(1, 1, 16, 16)"),
        (torch.rand(3, 16, 16), ValueError, "(3, 16, 16)"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), TypeError, "torch.uint8"),
        (torch.zeros(1, 3, 16, 16).numpy(), TypeError, "ndarray"),
        (torch.rand(1, 3, 15, 16), ValueError, "(15, 16)"),
        (torch.rand(1, 3, 16, 17), ValueError, "(16, 17)"),
    ],
)
def test_encode_rejects_bad_images(tiny, images, error, received):
    with pytest.raises(error) as info:
        tiny.encode(images)
    assert received in str(info.value)


def test_encode_accepts_the_unit_range_edges(tiny):
    images = torch.zeros(1, 3, 8, 8)
    images[..., :4] = 1.0
    assert tiny.encode(images).shape == (1, 16)


@pytest.mark.parametrize(
    ("codes", "kwargs", "received"),
    [
        (torch.full((1, 64), 64), {}, "got values in [64, 64]"),
        (torch.tensor([[0] * 63 + [-1]]), {}, "got values in [-1, 0]"),
        (torch.zeros(1, 60, dtype=torch.long), {}, "latent_hw"),
        (torch.zeros(1, 60, dtype=torch.long), {"latent_hw": (7, 7)}, "(7, 7)"),
        (torch.zeros(64, dtype=torch.long), {}, "(64,)"),
    ],
)
def test_decode_rejects_bad_codes(tiny, codes, kwargs, received):
    with pytest.raises(ValueError) as info:
        tiny.decode(codes, **kwargs)
    assert received in str(info.value)
    if "values" in received:
        assert "[0, 63]" in str(info.value)  # the valid range is named too


def test_decode_rejects_float_codes(tiny):
    with pytest.raises(TypeError, match="torch.float32"):
        tiny.decode(torch.zeros(1, 64))


@pytest.mark.slow
def test_save_pretrained_round_trip(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["model_type"] == "lvm-vqgan" and saved["name"] == "vqgan_tiny"
    loaded = VQGAN.from_pretrained(tmp_path / "model")
    assert loaded.config == tiny.config
    assert not loaded.training
    images = torch.rand(2, 3, 8, 8)
    codes = tiny.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), tiny.decode(codes))
    # saving again over an existing directory replaces the files and leaves nothing else behind
    loaded.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]


def test_save_pretrained_keeps_quantizer_options(tmp_path):
    model = VQGAN.from_name("vqgan_tiny", l2_normalized_codes=True, dead_code_threshold=0.1, commitment=0.5)
    model.save_pretrained(tmp_path)
    config = VQGAN.from_pretrained(tmp_path).config
    assert (config.l2_normalized_codes, config.dead_code_threshold, config.commitment) == (True, 0.1, 0.5)


# -- quantizer options ------------------------------------------------------------------------------
def test_norm_groups_regroup_every_groupnorm_and_keep_the_parameters():
    """taming's 32 groups are one channel each at a 32-channel width: a flat image's colour would be
    normalised away. norm_groups=1 normalises over all channels, so two flat colours stay apart."""
    taming = VQGAN.from_name("vqgan_demo", norm_groups=32)
    joint = VQGAN.from_name("vqgan_demo", norm_groups=1)
    norms = [m for m in joint.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 1 for m in norms)
    assert {k: v.shape for k, v in taming.state_dict().items()} == {k: v.shape for k, v in joint.state_dict().items()}
    # features of two flat images (red, blue): constant over space, a different level per channel
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.1, 0.9]])
    flat = (colours @ torch.randn(3, 32, generator=torch.Generator().manual_seed(0)))[:, :, None, None].expand(2, 32, 8, 8)
    with torch.no_grad():
        per_channel = taming.encoder.down[0].block[0].norm1(flat)
        joint_normed = joint.encoder.down[0].block[0].norm1(flat)
    assert per_channel.abs().max() < 1e-2  # red and blue both become zeros
    assert (joint_normed[0] - joint_normed[1]).abs().max() > 0.5
    with pytest.raises(ValueError, match="norm_groups 3"):
        VQGAN.from_name("vqgan_demo", norm_groups=3)


def test_l2_normalised_codes_use_cosine_similarity():
    model = VQGAN.from_name("vqgan_tiny", l2_normalized_codes=True).eval()
    with torch.no_grad():  # lengths far apart, so that euclidean and cosine nearest codes differ
        model.quantize.embedding.weight.mul_(torch.rand(64, 1) * 100)
    images = torch.rand(2, 3, 8, 8)
    codes = model.encode(images)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(images * 2 - 1)).permute(0, 2, 3, 1).reshape(-1, 8)
    codebook = model.quantize.embedding.weight
    cosine = F.normalize(z, dim=1) @ F.normalize(codebook, dim=1).t()
    assert torch.equal(codes.view(-1), cosine.argmax(dim=1))
    assert not torch.equal(codes.view(-1), torch.cdist(z, codebook).argmin(dim=1))
    # decoding looks up the unit-length rows
    vectors = F.normalize(codebook, dim=1)[codes].view(2, 4, 4, 8).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = ((model.decoder(model.post_quant_conv(vectors)) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(model.decode(codes), expected, atol=1e-5, rtol=0)


def _normalised_latents(model: VQGAN, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = model.quant_conv(model.encoder(pixels))
    return F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1)


def _distance_to_nearest(rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return (rows[:, None, :] - candidates[None, :, :]).norm(dim=-1).min(dim=1).values  # exact, unlike cdist


def test_dead_code_restart_initialises_the_codebook_from_the_first_batch():
    model = VQGAN.from_name("vqgan_tiny", l2_normalized_codes=True, dead_code_threshold=0.5).train()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = _normalised_latents(model, pixels)  # 128 latents for 64 codes
    before = model.quantize.embedding.weight.detach().clone()
    assert _distance_to_nearest(before, latents).min() > 1e-3
    _, _, codes = model(pixels)
    after = model.quantize.embedding.weight.detach()
    assert _distance_to_nearest(after, latents).max() < 1e-6  # every row is one of the batch's latents
    assert codes.shape == (2, 64)
    # each latent's code is the nearest (cosine) of the restarted book; for a latent that became a code
    # that is the latent itself
    cosine = latents @ F.normalize(after, dim=1).t()
    assert torch.equal(codes.view(-1), cosine.argmax(dim=1))


def test_dead_code_restart_spares_used_codes():
    model = VQGAN.from_name("vqgan_tiny", l2_normalized_codes=True, dead_code_threshold=0.5).train()
    model(torch.rand(2, 3, 16, 16) * 2 - 1)  # the first batch initialises every code
    first = model.quantize.embedding.weight.detach().clone()
    used, unused = torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool)
    used[:40], unused[40:] = True, True
    # code use as the moving average would record it: codes 0-39 in use, codes 40-63 not for long
    model.quantize.usage.copy_(torch.where(used, 1.0, 0.0))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = _normalised_latents(model, pixels)
    model(pixels)
    after = model.quantize.embedding.weight.detach()
    assert torch.equal(after[used], first[used])
    assert _distance_to_nearest(after[unused], latents).max() < 1e-6
    assert _distance_to_nearest(first[unused], latents).min() > 1e-3  # they did move


def test_dead_code_restart_is_off_in_eval_and_by_default():
    model = VQGAN.from_name("vqgan_tiny", dead_code_threshold=0.5).eval()
    before = model.quantize.embedding.weight.detach().clone()
    with torch.no_grad():
        model(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert torch.equal(model.quantize.embedding.weight, before)
    model = VQGAN.from_name("vqgan_tiny").train()
    before = model.quantize.embedding.weight.detach().clone()
    model(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert torch.equal(model.quantize.embedding.weight, before)


@pytest.mark.slow
def test_training_forward_gradients_reach_encoder_and_codebook():
    model = VQGAN.from_name("vqgan_tiny").train()
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    reconstruction, codebook_loss, _ = model(pixels)
    ((reconstruction - pixels).abs().mean() + codebook_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through estimator
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
