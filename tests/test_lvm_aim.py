"""AIM on the LVM trunk: patch order, sin-cos positions, the prefix-causal mask on every backend, the loss
recomputed by hand, ml-aim's parameter counts, bidirectional features, checkpoints and training."""

import pytest
import torch

from lvm import attention as A
from lvm.aim import AIM, AIMConfig, normalise_patches, patchify, sincos_positions

# ml-aim's own count of each trunk, L (12 d^2 + 4 d) + 2 d (aim-v1 models.py: LayerNorms with biases).
ML_AIM_TRUNKS = {"aim_600m": 679.6e6, "aim_1b": 1208.2e6, "aim_3b": 2718.2e6, "aim_7b": 6443.0e6}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AIM(AIMConfig.from_name("aim_tiny", attn_backend="sdpa")).eval()


def images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_patchify_is_raster_order_with_row_col_channel_inside():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(x, 4)  # [2, 4, 48]
    assert patches.shape == (2, 4, 48)
    # patch 1 is the top-right 4x4 block; its value 5 is (row 0, col 1, channel 2)
    block = x[1, :, 0:4, 4:8]  # [c, row, col]
    assert torch.equal(patches[1, 1], block.permute(1, 2, 0).reshape(-1))
    assert patches[1, 1, 5] == x[1, 2, 0, 5]
    assert torch.equal(patches[0, 2], x[0, :, 4:8, 0:4].permute(1, 2, 0).reshape(-1))  # second row of patches


def test_sincos_positions_match_ml_aim():
    # ml-aim SinCosPosEmbed: meshgrid(w, h, "xy"), first half from grid[0], each half (sin, cos).
    h = w = 3
    dim = 16
    grid = torch.stack(torch.meshgrid(torch.arange(w).float(), torch.arange(h).float(), indexing="xy")).reshape(2, 1, h, w)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2).float() / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    expected = torch.cat([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], dim=1)
    assert torch.allclose(sincos_positions(3, dim), expected, atol=1e-6)


def test_prefix_causal_mask_matrix():
    mask = A.prefix_causal_mask(3, 5, torch.device("cpu"))[0, 0].int()
    expected = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    )  # fmt: skip
    assert torch.equal(mask, expected)
    per_row = A.prefix_causal_mask(torch.tensor([1, 5]), 5, torch.device("cpu"))
    assert torch.equal(per_row[0, 0], torch.ones(5, 5, dtype=torch.bool).tril()) and per_row[1].all()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("prefix", [1, 6, 16, torch.tensor([3, 11])])
def test_backends_agree_with_eager(model, backend, prefix):
    x = images()
    with torch.no_grad():
        model.config.attn_backend = "eager"
        reference = model(x, prefix_len=prefix)
        model.config.attn_backend = backend
        out = model(x, prefix_len=prefix)
    model.config.attn_backend = "sdpa"
    assert torch.allclose(out, reference, atol=1e-5)


def test_xformers_bias_is_the_prefix_mask():
    mask = A.prefix_causal_mask(torch.tensor([2, 5]), 5, torch.device("cpu"))  # [2, 1, 5, 5]
    q5 = torch.zeros(2, 5, 2, 3, 8)  # [B, L, Hkv, H/Hkv, D]
    bias = A._tensor_bias(mask, q5)
    assert bias.shape == (2, 2, 3, 5, 5) and bias.stride(-2) % 8 == 0  # xformers' alignment
    assert torch.equal(bias.isfinite(), mask[:, :, None].expand_as(bias))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers has no CPU kernels")
def test_xformers_prefix_matches_sdpa():
    pytest.importorskip("xformers.ops")
    aim = AIM(AIMConfig.from_name("aim_tiny")).cuda().eval()
    x = images().cuda()
    with torch.no_grad():
        outs = {}
        for backend in ("xformers", "sdpa"):
            aim.config.attn_backend = backend
            outs[backend] = aim(x, prefix_len=torch.tensor([3, 9], device="cuda"))
    assert torch.allclose(outs["xformers"], outs["sdpa"], atol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_prefix_mask_in_the_model(model, backend):
    model.config.attn_backend = backend
    k, later, n = 5, 9, model.config.num_patches
    x = images(1)
    changed_late, changed_prefix = x.clone(), x.clone()
    changed_late[..., 8:12, 4:8] += 1.0  # patch 9 (row 2, col 1 of the 4x4 grid)
    changed_prefix[..., 0:4, 8:12] += 1.0  # patch 2, inside the prefix
    with torch.no_grad():
        base, late, early = (model(v, prefix_len=k)[0] for v in (x, changed_late, changed_prefix))
    model.config.attn_backend = "sdpa"
    moved = lambda out: (out - base).abs().amax(dim=-1) > 1e-6  # noqa: E731 - [N] which positions changed
    # a later patch leaves every earlier prediction as it was, and changes its own and all later ones
    assert not moved(late)[:later].any() and moved(late)[later:].all()
    # a prefix patch changes every prefix position (bidirectional there), the ones before it included
    assert moved(early)[:k].all() and moved(early).sum() == n


def test_causal_without_prefix(model):
    x, changed = images(1), images(1)
    changed[..., 0:4, 4:8] += 1.0  # patch 1
    with torch.no_grad():
        moved = (model(x, prefix_len=1) - model(changed, prefix_len=1))[0].abs().amax(-1) > 1e-6
    assert not moved[0] and moved[1:].all()


def test_features_are_bidirectional(model):
    x, changed = images(1), images(1)
    changed[..., 12:16, 12:16] += 1.0  # the last patch
    with torch.no_grad():
        moved = (model.features(x) - model.features(changed))[0].abs().amax(-1) > 1e-6
    assert moved.all()
    assert model.features(x).shape == (1, 16, 64)
    assert model.features(x, layers=[0, 1]).shape == (1, 16, 64)


@pytest.mark.parametrize("prefix", [1, 7, 15])
def test_loss_by_hand(model, prefix):
    x = images(3) * 2 - 0.5  # any range: the loss normalises the pixels exactly as passed
    with torch.no_grad():
        loss = model.loss(x, prefix_len=prefix)
        predictions = model(x, prefix_len=prefix)
    p, n = model.config.patch_size, model.config.num_patches
    total, count = 0.0, 0
    for b in range(3):
        for target in range(prefix, n):  # patches k..N-1, predicted at positions k-1..N-2
            row, col = divmod(target, model.config.grid_size)
            values = x[b, :, row * p : (row + 1) * p, col * p : (col + 1) * p].permute(1, 2, 0).reshape(-1).double()
            normalised = (values - values.mean()) / (values.var(unbiased=True) + 1e-6).sqrt()
            total += (predictions[b, target - 1].double() - normalised).pow(2).mean()
            count += 1
    assert torch.allclose(loss.double(), total / count, atol=1e-5)


def test_per_image_prefix_weights_every_target_patch_equally(model):
    x = images(2)
    prefix = torch.tensor([2, 12])
    with torch.no_grad():
        predictions = model(x, prefix_len=prefix)
        loss = model.loss(x, prefix_len=prefix)
    targets = normalise_patches(patchify(x, 4))
    errors = [(predictions[b, k - 1 : -1] - targets[b, k:]).pow(2).mean(-1) for b, k in enumerate(prefix.tolist())]
    assert torch.allclose(loss, torch.cat(errors).mean(), atol=1e-6)


def test_prefix_out_of_range_is_refused(model):
    with pytest.raises(ValueError, match="prefix_len must lie in 1..15"):
        model.loss(images(), prefix_len=16)
    with pytest.raises(ValueError, match=r"takes \[B, 3, 16, 16\]"):
        model(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("name", list(ML_AIM_TRUNKS))
def test_preset_trunks_match_ml_aim(name):
    config = AIMConfig.from_name(name)
    with torch.device("meta"):
        trunk = AIM(config).num_params(trunk_only=True)
    assert abs(trunk / ML_AIM_TRUNKS[name] - 1) < 0.02
    assert config.intermediate_size == round(8 * config.hidden_size / 3)
    assert (config.image_size, config.patch_size, config.num_patches) == (224, 14, 256)


def test_unknown_preset():
    with pytest.raises(ValueError, match="valid names: aim_600m"):
        AIMConfig.from_name("aim_2b")


def test_save_and_load(model, tmp_path):
    model.save_pretrained(tmp_path / "aim")
    loaded = AIM.from_pretrained(tmp_path / "aim").eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x, prefix_len=4), model(x, prefix_len=4))
    with pytest.raises(ValueError, match="does not fit"):
        AIM.from_pretrained(tmp_path / "aim", hidden_size=32)


@pytest.mark.slow
def test_training_lowers_the_loss():
    from data.images import ProceduralImages

    torch.manual_seed(0)
    aim = AIM(AIMConfig.from_name("aim_tiny", attn_backend="sdpa"))
    batch = torch.stack([ProceduralImages("train", 16, 16)[i] for i in range(16)])
    prefix = torch.randint(1, aim.config.num_patches, (16,))
    optimizer = torch.optim.AdamW(aim.parameters(), lr=3e-3)
    with torch.no_grad():
        before = aim.loss(batch, prefix_len=prefix).item()
    for _ in range(30):
        optimizer.zero_grad()
        aim.loss(batch, prefix_len=prefix).backward()
        optimizer.step()
    with torch.no_grad():
        after = aim.loss(batch, prefix_len=prefix).item()
    assert after < 0.85 * before, (before, after)
