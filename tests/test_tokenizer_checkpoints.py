"""Checkpoint import parity: taming-transformers runs and open-muse folders load into our VQGAN and give
the codes and pixels their own code computes.

taming is installed, so its reference is its own modules. open-muse is not installable, so its layout is
written here from its source (muse/modeling_taming_vqgan.py) and its forward pass re-implemented with
torch.nn.functional: neither reuses anything of tokenizer.model."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn

from tokenizer import VQGAN

# --------------------------------------------------------------------------------------------------
# taming-transformers
# --------------------------------------------------------------------------------------------------
DDCONFIG = dict(
    double_z=False,
    z_channels=16,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[16],
    dropout=0.0,
)
EMBED_DIM, N_EMBED = 8, 64


class TamingVQModel(nn.Module):
    """taming.models.vqgan.VQModel's module layout (that class does not import on this Lightning)."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int):
        super().__init__()
        with contextlib.redirect_stdout(io.StringIO()):
            self.encoder = Encoder(**ddconfig)
            self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    @torch.no_grad()
    def reference(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[0, 1] images -> (codes [B, h*w], decoded [0, 1] images), the way taming computes them."""
        z = self.quant_conv(self.encoder(2 * images - 1))
        z_q, _, (_, _, indices) = self.quantize(z)
        decoded = self.decoder(self.post_quant_conv(z_q))
        return indices.view(images.shape[0], -1), ((decoded + 1) / 2).clamp(0, 1)


@pytest.fixture(scope="module")
def taming_model() -> TamingVQModel:
    generator = torch.Generator().manual_seed(1)
    model = TamingVQModel(DDCONFIG, N_EMBED, EMBED_DIM).eval()
    with torch.no_grad():
        for param in model.parameters():
            scale = 0.02 if param.ndim > 1 else 0.1  # GroupNorm affine and biases moved off 1 / 0 too
            param.add_(torch.randn(param.shape, generator=generator) * scale)
        # a codebook spread like the latents, so that many codes are used
        latents = model.quant_conv(model.encoder(torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1))
        mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
        model.quantize.embedding.weight.copy_(
            mean + std * torch.randn(N_EMBED, EMBED_DIM, generator=generator)
        )
    return model


def taming_project_yaml() -> dict:
    return {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": EMBED_DIM,
                "n_embed": N_EMBED,
                "ddconfig": dict(DDCONFIG),
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {
                        "disc_conditional": False,
                        "disc_in_channels": 3,
                        "disc_start": 10000,
                        "disc_weight": 0.8,
                        "codebook_weight": 1.0,
                    },
                },
            },
        },
        "data": {"target": "main.DataModuleFromConfig", "params": {"batch_size": 4}},
    }


def taming_checkpoint(model: nn.Module) -> dict:
    state_dict = dict(model.state_dict())
    state_dict["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state_dict["loss.discriminator.main.0.bias"] = torch.randn(64)
    state_dict["loss.logvar"] = torch.zeros(())
    return {"state_dict": state_dict, "global_step": 3, "epoch": 0}


def write_taming_run(root, model, ckpt_dir="checkpoints", config_name="2020-01-01T00-00-00-project.yaml"):
    run = root / "2020-01-01T00-00-00_custom_vqgan"
    (run / ckpt_dir).mkdir(parents=True)
    (run / "configs").mkdir()
    torch.save(taming_checkpoint(model), run / ckpt_dir / "last.ckpt")
    (run / "configs" / config_name).write_text(yaml.safe_dump(taming_project_yaml()))
    return run


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # 16x16 keeps the tests fast; the blocks (attention included) are set by the configured resolution 32
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def taming_reference(taming_model, images) -> tuple[torch.Tensor, torch.Tensor]:
    return taming_model.reference(images)


def assert_same_weights(ours: VQGAN, source: nn.Module):
    theirs = source.state_dict()
    assert set(ours.state_dict()) == set(theirs)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs[name]), name


def assert_parity(ours: VQGAN, reference_codes: torch.Tensor, reference_images: torch.Tensor, images):
    codes = ours.encode(images)
    assert codes.dtype == torch.long
    assert torch.equal(codes, reference_codes)
    assert reference_codes.unique().numel() >= 8, "the test model should use many codes"
    assert codes.shape == (
        images.shape[0],
        (images.shape[2] // 2 ** (len(ours.config.channel_mult) - 1)) ** 2,
    )
    decoded = ours.decode(codes)
    assert decoded.shape == images.shape
    # the comparison says something only if the pixels are not all clamped
    assert ((reference_images > 0.01) & (reference_images < 0.99)).float().mean() > 0.5
    torch.testing.assert_close(decoded, reference_images, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_taming_run_directory_matches_taming(tmp_path, taming_model, taming_reference, images):
    run = write_taming_run(tmp_path, taming_model)
    ours = VQGAN.from_pretrained(run)
    assert ours.config.pixel_range == (-1.0, 1.0)
    assert ours.config.resolution == 32 and ours.config.tokens_per_image == 256
    assert ours.config.attn_resolutions == (16,) and ours.config.mid_attention
    assert ours.config.codebook_size == N_EMBED and ours.config.embed_dim == EMBED_DIM
    assert ours.config.extra["source"] == "taming"
    assert ours.config.extra["project"].endswith("2020-01-01T00-00-00-project.yaml")
    assert not any(k.startswith("loss.") for k in ours.state_dict())
    assert_same_weights(ours, taming_model)
    assert not ours.training
    assert_parity(ours, *taming_reference, images)


def test_taming_ckpt_path_and_newest_project_yaml(tmp_path, taming_model):
    run = write_taming_run(tmp_path, taming_model)
    # an older project file with another shape: the newest one (taming writes one per resume) wins
    older = taming_project_yaml()
    older["model"]["params"]["n_embed"] = 32
    (run / "configs" / "2019-12-31T00-00-00-project.yaml").write_text(yaml.safe_dump(older))
    (run / "configs" / "2020-01-01T00-00-00-lightning.yaml").write_text("lightning: {}\n")
    ours = VQGAN.from_pretrained(run / "checkpoints" / "last.ckpt")
    assert ours.config.codebook_size == N_EMBED
    assert ours.config.extra["checkpoint"].endswith("last.ckpt")
    assert_same_weights(ours, taming_model)


def test_taming_released_layout(tmp_path, taming_model):
    """The released ImageNet models unpack as <name>/ckpts/last.ckpt + <name>/configs/model.yaml."""
    run = write_taming_run(tmp_path, taming_model, ckpt_dir="ckpts", config_name="model.yaml")
    ours = VQGAN.from_pretrained(run)
    assert ours.config.resolution == 32 and ours.config.extra["project"].endswith("model.yaml")
    assert ours.config.name == "2020-01-01T00-00-00_custom_vqgan"
    assert_same_weights(ours, taming_model)


def test_taming_ckpt_beside_same_named_yaml(tmp_path, taming_model):
    """How taming's notebooks store the downloads: vqgan_x.ckpt next to vqgan_x.yaml."""
    torch.save(taming_checkpoint(taming_model), tmp_path / "vqgan_x.ckpt")
    (tmp_path / "vqgan_x.yaml").write_text(yaml.safe_dump(taming_project_yaml()))
    ours = VQGAN.from_pretrained(tmp_path / "vqgan_x.ckpt")
    assert ours.config.resolution == 32 and ours.config.name == "vqgan_x"
    assert_same_weights(ours, taming_model)


@pytest.mark.slow
def test_taming_bare_ckpt_shape_from_state_dict(tmp_path, taming_model, taming_reference, images):
    (tmp_path / "weights").mkdir()
    torch.save(taming_checkpoint(taming_model), tmp_path / "weights" / "model.ckpt")
    ours = VQGAN.from_pretrained(tmp_path / "weights" / "model.ckpt")
    config = ours.config
    assert config.extra["project"] is None
    assert (config.base_channels, config.channel_mult, config.num_res_blocks) == (32, (1, 2), 1)
    assert (config.z_channels, config.embed_dim, config.codebook_size) == (16, EMBED_DIM, N_EMBED)
    assert config.mid_attention and config.pixel_range == (-1.0, 1.0)
    # the resolution is written nowhere: 256 by default, the attention level placed relative to it
    assert config.resolution == 256 and config.attn_resolutions == (128,)
    assert_same_weights(ours, taming_model)
    assert_parity(ours, *taming_reference, images)
    resized = VQGAN.from_pretrained(tmp_path / "weights" / "model.ckpt", resolution=32)
    assert resized.config.attn_resolutions == (16,) and resized.config.tokens_per_image == 256


def test_taming_import_survives_our_save_pretrained(tmp_path, taming_model, taming_reference, images):
    ours = VQGAN.from_pretrained(write_taming_run(tmp_path, taming_model))
    ours.save_pretrained(tmp_path / "ours")
    again = VQGAN.from_pretrained(tmp_path / "ours")
    assert again.config.pixel_range == (-1.0, 1.0)
    assert again.config.extra["source"] == "taming"
    assert_parity(again, *taming_reference, images)


def test_taming_without_attention_in_state_dict(tmp_path):
    """A bare ckpt without any attention (mid included) is read as such."""
    ddconfig = dict(DDCONFIG, attn_resolutions=[])
    model = TamingVQModel(ddconfig, N_EMBED, EMBED_DIM)
    model.encoder.mid.attn_1 = nn.Identity()
    model.decoder.mid.attn_1 = nn.Identity()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.ckpt")
    ours = VQGAN.from_pretrained(tmp_path / "plain.ckpt")
    assert ours.config.attn_resolutions == () and not ours.config.mid_attention
    assert set(ours.state_dict()) == set(model.state_dict())


# --------------------------------------------------------------------------------------------------
# open-muse
# --------------------------------------------------------------------------------------------------
MUSE_DEFAULTS = dict(
    resolution=256,
    num_channels=3,
    hidden_channels=128,
    channel_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    decoder_res_blocks=None,
    extra_mid_res_blocks=None,
    decoder_hidden_channels=None,
    decoder_channel_mult=None,
    attn_resolutions=(16,),
    no_attn_mid_block=False,
    z_channels=256,
    num_embeddings=1024,
    quantized_embed_dim=256,
    dropout=0.0,
    resample_with_conv=True,
    commitment_cost=0.25,
)

# open-muse configs without attention (as the released LVM tokenizer), differing only in shape.
_MUSE_ATTENTION_FREE = dict(
    num_channels=3, num_res_blocks=2, attn_resolutions=[], no_attn_mid_block=True, dropout=0.0,
    resample_with_conv=True, commitment_cost=0.25,
)  # fmt: skip
MUSE_SMALL = dict(
    _MUSE_ATTENTION_FREE, resolution=32, hidden_channels=32, channel_mult=[1, 2, 2], z_channels=16,
    num_embeddings=128, quantized_embed_dim=8,
)  # fmt: skip
# The released LVM tokenizer's config (open-muse VQGAN f16, 8192 codes).
MUSE_LVM = dict(
    _MUSE_ATTENTION_FREE, resolution=256, hidden_channels=128, channel_mult=[1, 2, 2, 4, 6], z_channels=64,
    num_embeddings=8192, quantized_embed_dim=64,
)  # fmt: skip


def muse_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of muse's VQGANModel(**config), for configs without attention."""
    c = {**MUSE_DEFAULTS, **config}
    assert not c["attn_resolutions"] and c["no_attn_mid_block"], "this generator covers attention-free models"
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name, channels):
        shapes[f"{name}.weight"] = (channels,)
        shapes[f"{name}.bias"] = (channels,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    hidden, mult, levels = c["hidden_channels"], list(c["channel_mult"]), len(c["channel_mult"])
    # encoder
    conv("encoder.conv_in", c["num_channels"], hidden, 3)
    for i in range(levels):
        block_in = hidden * ([1] + mult)[i]
        for j in range(c["num_res_blocks"]):
            resnet(f"encoder.down.{i}.block.{j}", block_in, hidden * mult[i])
            block_in = hidden * mult[i]
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid = hidden * mult[-1]
    resnet("encoder.mid.block_1", mid, mid)
    resnet("encoder.mid.block_2", mid, mid)
    norm("encoder.norm_out", mid)
    conv("encoder.conv_out", mid, c["z_channels"], 3)
    # decoder
    conv("decoder.conv_in", c["z_channels"], mid, 3)
    resnet("decoder.mid.block_1", mid, mid)
    resnet("decoder.mid.block_2", mid, mid)
    for i in range(levels):
        block_in = hidden * mult[min(i + 1, levels - 1)]
        for j in range(c["num_res_blocks"] + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, hidden * mult[i])
            block_in = hidden * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", hidden * mult[0])
    conv("decoder.conv_out", hidden * mult[0], c["num_channels"], 3)
    # quantizer
    shapes["quantize.embedding.weight"] = (c["num_embeddings"], c["quantized_embed_dim"])
    conv("quant_conv", c["z_channels"], c["quantized_embed_dim"], 1)
    conv("post_quant_conv", c["quantized_embed_dim"], c["z_channels"], 1)
    return shapes


class MuseReference:
    """muse's VQGANModel forward pass (attention-free configs) in torch.nn.functional."""

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor]):
        self.c = {**MUSE_DEFAULTS, **config}
        self.sd = state_dict
        self.levels = len(self.c["channel_mult"])

    def conv(self, x, name, stride=1):
        weight = self.sd[f"{name}.weight"]
        padding = 0 if stride == 2 else weight.shape[-1] // 2
        return F.conv2d(x, weight, self.sd[f"{name}.bias"], stride=stride, padding=padding)

    def norm(self, x, name):
        return F.group_norm(x, 32, self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], eps=1e-6)

    def resnet(self, x, name):
        h = self.conv(F.silu(self.norm(x, f"{name}.norm1")), f"{name}.conv1")
        h = self.conv(F.silu(self.norm(h, f"{name}.norm2")), f"{name}.conv2")
        if f"{name}.nin_shortcut.weight" in self.sd:
            x = self.conv(x, f"{name}.nin_shortcut")
        return x + h

    def encode_latents(self, pixels):
        h = self.conv(pixels, "encoder.conv_in")
        for i in range(self.levels):
            for j in range(self.c["num_res_blocks"]):
                h = self.resnet(h, f"encoder.down.{i}.block.{j}")
            if i != self.levels - 1:
                h = self.conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", stride=2)
        h = self.resnet(self.resnet(h, "encoder.mid.block_1"), "encoder.mid.block_2")
        h = self.conv(F.silu(self.norm(h, "encoder.norm_out")), "encoder.conv_out")
        return self.conv(h, "quant_conv")

    def codes(self, pixels):
        z = self.encode_latents(pixels)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codebook = self.sd["quantize.embedding.weight"]
        distances = (flat[:, None, :] - codebook[None, :, :]).pow(2).sum(-1)
        return distances.argmin(dim=1).view(z.shape[0], -1)

    def decode(self, codes, side):
        z = self.sd["quantize.embedding.weight"][codes]  # [B, n, d]
        z = z.view(codes.shape[0], side, side, -1).permute(0, 3, 1, 2)
        h = self.conv(self.conv(z, "post_quant_conv"), "decoder.conv_in")
        h = self.resnet(self.resnet(h, "decoder.mid.block_1"), "decoder.mid.block_2")
        for i in reversed(range(self.levels)):
            for j in range(self.c["num_res_blocks"] + 1):
                h = self.resnet(h, f"decoder.up.{i}.block.{j}")
            if i != 0:
                h = self.conv(
                    F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv"
                )
        return self.conv(F.silu(self.norm(h, "decoder.norm_out")), "decoder.conv_out")


def random_muse_state_dict(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state_dict = {}
    for name, shape in muse_shapes(config).items():
        if len(shape) == 4:  # conv weights, scaled to keep activations of order one
            fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=generator) / fan_in**0.5
        elif (
            name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_out.weight")
        ):
            value = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            value = 0.1 * torch.randn(shape, generator=generator)
        state_dict[name] = value
    # output pixels around 0.5, mostly inside [0, 1]
    state_dict["decoder.conv_out.weight"] *= 0.2
    state_dict["decoder.conv_out.bias"] = 0.5 + 0.05 * torch.randn(3, generator=generator)
    return state_dict


@pytest.fixture(scope="module")
def muse_folder(tmp_path_factory):
    generator = torch.Generator().manual_seed(3)
    state_dict = random_muse_state_dict(MUSE_SMALL, generator)
    reference = MuseReference(MUSE_SMALL, state_dict)
    with torch.no_grad():  # a codebook spread like the latents
        latents = reference.encode_latents(torch.rand(2, 3, 16, 16, generator=generator))
        mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
        state_dict["quantize.embedding.weight"] = mean + std * torch.randn(128, 8, generator=generator)
    folder = tmp_path_factory.mktemp("muse") / "vqgan-muse-small"
    folder.mkdir()
    config = {"_class_name": "VQGANModel", "_version": "0.0.1", **MUSE_SMALL}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state_dict, folder / "pytorch_model.bin")
    return folder, reference


@pytest.fixture(scope="module")
def muse_reference(muse_folder, images) -> tuple[torch.Tensor, torch.Tensor]:
    """muse's codes and [0, 1]-clamped decoded images; muse works on [0, 1] pixels directly."""
    _, reference = muse_folder
    with torch.no_grad():
        codes = reference.codes(images)
        return codes, reference.decode(codes, side=4).clamp(0, 1)


def test_muse_shapes_generator_matches_muse_layout_rules():
    """The generator itself, checked against counts read off muse's source for MUSE_SMALL."""
    shapes = muse_shapes(MUSE_SMALL)
    assert sum(1 for k in shapes if k.endswith("nin_shortcut.weight")) == 2  # encoder 32->64, decoder 64->32
    assert [k for k in shapes if "downsample" in k] == [
        f"encoder.down.{i}.downsample.conv.{p}" for i in (0, 1) for p in ("weight", "bias")
    ]
    assert [k for k in shapes if "upsample" in k] == [
        f"decoder.up.{i}.upsample.conv.{p}" for i in (1, 2) for p in ("weight", "bias")
    ]
    assert shapes["decoder.up.2.block.0.conv1.weight"] == (64, 64, 3, 3)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (32, 64, 1, 1)
    assert "decoder.up.0.block.2.conv2.weight" in shapes and "decoder.up.0.block.3.conv2.weight" not in shapes
    assert not any("attn" in k for k in shapes)


def test_muse_folder_matches_reference(muse_folder, muse_reference, images):
    folder, _ = muse_folder
    ours = VQGAN.from_pretrained(folder)
    assert ours.config.pixel_range == (0.0, 1.0)
    assert ours.config.extra["source"] == "open-muse"
    assert (ours.config.channel_mult, ours.config.num_res_blocks) == ((1, 2, 2), 2)
    assert not ours.config.mid_attention and ours.config.attn_resolutions == ()
    assert ours.config.tokens_per_image == 64
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == muse_shapes(MUSE_SMALL)
    assert muse_reference[0].shape == (2, 16)
    assert_parity(ours, *muse_reference, images)


def test_muse_safetensors_folder(tmp_path, muse_folder, muse_reference, images):
    from safetensors.torch import save_file

    folder, _ = muse_folder
    state_dict = torch.load(folder / "pytorch_model.bin", weights_only=True)
    (tmp_path / "m").mkdir()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text((folder / "config.json").read_text())
    ours = VQGAN.from_pretrained(tmp_path / "m")
    assert torch.equal(ours.encode(images), muse_reference[0])


def test_released_lvm_tokenizer_layout_matches_preset():
    """The released LVM tokenizer (open-muse, f16, 8192 codes) fits the vqgan_f16_8192 preset key for key."""
    with torch.device("meta"):
        ours = VQGAN.from_name("vqgan_f16_8192")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == muse_shapes(MUSE_LVM)
    assert ours.config.pixel_range == (0.0, 1.0)
    assert ours.config.tokens_per_image == 256


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
class _Opaque:
    """Not a tensor: weights_only loading refuses to rebuild it."""


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no VQGAN checkpoint"):
        VQGAN.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "kind", ["txt", "json_dir", "empty_dir", "ckpt_without_state_dict", "text_as_ckpt", "empty_ckpt"]
)
def test_not_a_checkpoint(tmp_path, kind):
    if kind == "txt":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
        expected = r"\.txt file; expected .*taming-transformers"
    elif kind == "json_dir":
        path = tmp_path
        (path / "config.json").write_text(json.dumps({"foo": 1, "bar": [2]}))
        expected = "neither our VQGAN config nor an open-muse"
    elif kind == "empty_dir":
        path = tmp_path
        expected = "holds no VQGAN checkpoint; expected .*save_pretrained"
    elif kind == "ckpt_without_state_dict":
        path = tmp_path / "x.ckpt"
        torch.save({"weights": {"a": torch.zeros(2)}}, path)
        expected = "no 'state_dict'"
    elif kind == "text_as_ckpt":
        path = tmp_path / "x.ckpt"
        path.write_text("this is not a checkpoint at all")
        expected = "not a readable torch checkpoint.*expected"
    else:
        path = tmp_path / "x.ckpt"
        path.write_bytes(b"")
        expected = "not a readable torch checkpoint"
    with pytest.raises(ValueError, match=expected):
        VQGAN.from_pretrained(path)


def test_project_yaml_that_is_not_a_vqgan_config(tmp_path, taming_model):
    run = write_taming_run(tmp_path, taming_model)
    (run / "configs" / "2020-01-01T00-00-00-project.yaml").write_text("model:\n  target: foo\n")
    with pytest.raises(ValueError, match="not a taming-transformers VQModel config"):
        VQGAN.from_pretrained(run)


def test_wrong_shapes_are_listed(tmp_path, taming_model):
    checkpoint = taming_checkpoint(taming_model)
    checkpoint["state_dict"]["quant_conv.weight"] = torch.zeros(4, 16, 1, 1)
    checkpoint["state_dict"]["quant_conv.bias"] = torch.zeros(4)
    del checkpoint["state_dict"]["decoder.conv_out.bias"]
    run = write_taming_run(tmp_path, taming_model)
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError) as info:
        VQGAN.from_pretrained(run)
    message = str(info.value)
    assert "quant_conv.weight: checkpoint (4, 16, 1, 1) vs model (8, 16, 1, 1)" in message
    assert "quant_conv.bias" in message
    assert "missing: decoder.conv_out.bias" in message


def test_wrong_shapes_for_our_own_directory(tmp_path):
    VQGAN.from_name("vqgan_tiny").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="wrong shape: quantize.embedding.weight: checkpoint \\(64, 8\\)"):
        VQGAN.from_pretrained(tmp_path, codebook_size=32)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("decoder_channel_mult", [1, 2, 4]),
        ("decoder_res_blocks", 3),
        ("extra_mid_res_blocks", 1),
        ("decoder_hidden_channels", 64),
        ("resample_with_conv", False),
    ],
)
def test_unsupported_muse_options(tmp_path, muse_folder, option, value):
    folder, _ = muse_folder
    config = json.loads((folder / "config.json").read_text())
    config[option] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "pytorch_model.bin").write_bytes((folder / "pytorch_model.bin").read_bytes())
    with pytest.raises(ValueError, match=f"open-muse options .*{option}.* not supported"):
        VQGAN.from_pretrained(tmp_path)


def test_muse_attention_with_one_res_block_is_refused(tmp_path, muse_folder):
    folder, _ = muse_folder
    config = dict(json.loads((folder / "config.json").read_text()), attn_resolutions=[8], num_res_blocks=1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_res_blocks < 2"):
        VQGAN.from_pretrained(tmp_path)


def test_muse_folder_without_weights(tmp_path, muse_folder):
    folder, _ = muse_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="no pytorch_model.bin or model.safetensors"):
        VQGAN.from_pretrained(tmp_path)


def test_pickled_objects_are_refused(tmp_path, taming_model):
    checkpoint = taming_checkpoint(taming_model)
    checkpoint["callbacks"] = {"opaque": _Opaque()}
    torch.save(checkpoint, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="weights_only"):
        VQGAN.from_pretrained(tmp_path / "x.ckpt")


def test_pickled_objects_in_muse_weights_are_refused(tmp_path, muse_folder):
    folder, _ = muse_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save({"quant_conv.weight": _Opaque()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        VQGAN.from_pretrained(tmp_path)
