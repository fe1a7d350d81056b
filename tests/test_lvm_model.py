"""LVM shapes and sizes: preset parameter counts, config validation, FLOPs, training-time options."""

import pytest
import torch

from lvm import LVM, LVMConfig
from lvm.config import PRESETS

# DESIGN.md's table: billions of parameters.
DESIGN_PARAMS = {
    "vqlm_100m": 0.12,
    "vqlm_300m": 0.29,
    "vqlm_600m": 0.65,
    "vqlm_1b": 1.15,
    "vqlm_3b": 3.27,
    "vqlm_7b": 6.54,
}


def expected_params(c: LVMConfig) -> int:
    """LLaMA by hand: embeddings + lm_head, per layer q/o (C x C), k/v (C x Hkv*D), 3 SwiGLU
    matrices and 2 norms, plus the final norm."""
    kv = c.num_kv_heads * c.head_dim
    per_layer = 2 * c.hidden_size**2 + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    per_layer += 2 * c.hidden_size
    return 2 * c.vocab_size * c.hidden_size + c.num_layers * per_layer + c.hidden_size


@pytest.mark.parametrize("name", sorted(DESIGN_PARAMS))
def test_preset_parameter_counts(name):
    config = LVMConfig.from_name(name)
    with torch.device("meta"):
        model = LVM(config)
    count = model.num_params()
    assert count == expected_params(config)
    # within 1% of the table, or of its printed precision (0.12B stands for 0.115..0.125B)
    table = DESIGN_PARAMS[name]
    assert round(count / 1e9, 2) == table
    assert abs(count / 1e9 - table) / table < max(0.01, 0.005 / table)
    assert model.num_params(non_embedding=True) == count - config.vocab_size * config.hidden_size
    assert (config.vocab_size, config.max_position_embeddings, config.rms_norm_eps, config.rope_theta) == (
        8292,
        4096,
        1e-6,
        10000.0,
    )


def test_small_presets():
    demo, tiny = LVMConfig.from_name("vqlm_demo"), LVMConfig.from_name("vqlm_tiny")
    assert (demo.codebook_size, demo.vocab_size, demo.bos_id, demo.eos_id) == (512, 612, 512, 513)
    assert (tiny.bos_id, tiny.eos_id, tiny.num_kv_heads, tiny.head_dim) == (8192, 8193, 2, 16)
    assert LVMConfig.from_name("vqlm_300m").num_kv_heads == 8  # None means one kv head per query head


def test_config_errors():
    with pytest.raises(ValueError, match="unknown LVM preset 'vqlm_9b'.*vqlm_300m.*vqlm_tiny"):
        LVMConfig.from_name("vqlm_9b")
    with pytest.raises(ValueError, match="vocab_size 8193 .* codebook_size 8192"):
        LVMConfig.from_name("vqlm_tiny", vocab_size=8193)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        LVMConfig.from_name("vqlm_tiny", num_heads=3)
    with pytest.raises(ValueError, match="not divisible by num_kv_heads"):
        LVMConfig.from_name("vqlm_tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="attn_backend"):
        LVMConfig.from_name("vqlm_tiny", attn_backend="flash")


def test_parameter_names_are_hf_llama():
    names = set(LVM(LVMConfig.from_name("vqlm_tiny")).state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    layer = {n.removeprefix("model.layers.1.") for n in names if n.startswith("model.layers.1.")}
    assert layer == {
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    }


def test_init():
    model = LVM(LVMConfig.from_name("vqlm_demo"))
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight):
        assert abs(weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(256))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied


def test_flops_per_token():
    model = LVM(LVMConfig.from_name("vqlm_demo"))
    c = model.config
    per_layer = 4 * 256 * 256 + 3 * 256 * 688 + 2 * 256
    non_embedding = 4 * per_layer + 256 + 612 * 256  # layers, final norm, lm_head
    assert model.num_params(non_embedding=True) == non_embedding
    assert model.flops_per_token(1024) == 6 * non_embedding + 12 * c.num_layers * c.hidden_size * 1024


def test_forward_shapes_and_training_step():
    model = LVM(LVMConfig.from_name("vqlm_tiny", vocab_size=300, codebook_size=256))
    ids = torch.randint(0, 300, (2, 16))
    logits = model(ids)
    assert logits.shape == (2, 16, 300) and logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_activation_checkpointing_same_gradients():
    """Catches a switch that is ignored (no recomputation: each block runs once) or changes the gradients."""
    config = LVMConfig.from_name("vqlm_tiny", vocab_size=300, codebook_size=256)
    ids = torch.randint(0, 300, (2, 16))
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = LVM(config)
        model.activation_checkpointing = checkpointing
        model.model.layers[0].register_forward_pre_hook(lambda *_, on=checkpointing: calls.append(on))
        model(ids).square().mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    # checkpointing reruns the block's forward during backward (a pre-hook: the rerun stops early)
    assert calls == [False, True, True]


def test_bf16_forward():
    model = LVM(LVMConfig.from_name("vqlm_tiny", vocab_size=300, codebook_size=256))
    ids = torch.randint(0, 300, (2, 16))
    reference = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ids)
    assert not mixed.float().isnan().any()
    assert (mixed.float() - reference).abs().max() < 0.05 * reference.abs().max()
    half = model.to(torch.bfloat16)(ids)
    assert half.dtype == torch.bfloat16 and (half.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_presets_are_valid():
    assert set(DESIGN_PARAMS) | {"vqlm_demo", "vqlm_tiny"} == set(PRESETS)
