"""HF interop: logits equal transformers' LlamaForCausalLM both ways; sharded and half-precision
checkpoints; shape errors; Lightning checkpoint conversion."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lvm import LVM, LVMConfig
from lvm.hf import config_to_hf

TOL = 1e-4


def hf_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def our_logits(model: LVM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.fixture
def ids():
    return torch.randint(0, 8292, (2, 24))


def random_hf_llama() -> LlamaForCausalLM:
    config = LlamaConfig(**{k: v for k, v in config_to_hf(LVMConfig.from_name("vqlm_tiny"), torch.float32).items()})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF inits norms at one: make them random so a norm mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def test_ours_to_hf(tmp_path, ids):
    ours = LVM(LVMConfig.from_name("vqlm_tiny")).eval()
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and saved["model_type"] == "llama"
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    expected = our_logits(ours, ids)
    assert expected.shape == (2, 24, 8292)
    assert (hf_logits(hf, ids) - expected).abs().max() < TOL
    # and back: the round trip keeps the config (preset name and codebook included) and the logits
    again = LVM.from_pretrained(tmp_path)
    assert again.config == ours.config
    assert torch.equal(our_logits(again, ids), expected)


@pytest.mark.parametrize("shard_size", [None, "100KB"])
def test_hf_to_ours(tmp_path, ids, shard_size):
    hf = random_hf_llama()
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    if shard_size:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = LVM.from_pretrained(tmp_path)
    assert (our_logits(ours, ids) - hf_logits(hf, ids)).abs().max() < TOL
    assert ours.config.num_kv_heads == 2 and ours.config.vocab_size == 8292


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(tmp_path, ids, dtype):
    hf = random_hf_llama().to(dtype)
    hf.save_pretrained(tmp_path)
    # default: computed in fp32 from the stored half weights, exactly what an fp32 HF model of them gives
    ours = LVM.from_pretrained(tmp_path)
    assert ours.lm_head.weight.dtype == torch.float32
    reference = hf_logits(hf.float(), ids)
    assert (our_logits(ours, ids) - reference).abs().max() < TOL
    kept = LVM.from_pretrained(tmp_path, dtype="auto")
    assert {p.dtype for p in kept.parameters()} == {dtype}
    assert torch.equal(kept.lm_head.weight.float(), ours.lm_head.weight)


def test_mismatched_checkpoint_lists_tensors(tmp_path):
    LVM(LVMConfig.from_name("vqlm_tiny")).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        LVM.from_pretrained(tmp_path, intermediate_size=128)
    message = str(error.value)
    for i in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.{proj}.weight" in message
    assert "(176, 64)" in message and "(128, 64)" in message
    assert "q_proj" not in message


def test_unsupported_llama_variant(tmp_path):
    LVM(LVMConfig.from_name("vqlm_tiny")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope scaling"):
        LVM.from_pretrained(tmp_path)


@pytest.mark.slow
def test_convert_lightning_checkpoint(tmp_path, ids):
    """scripts/convert_checkpoint.py: a training checkpoint (keys `model.` + ours, LVMModule's
    hyper-parameters) -> an HF directory with the same logits."""
    model = LVM(LVMConfig.from_name("vqlm_tiny"))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["teacher.lm_head.weight"] = torch.zeros(3)  # other sub-modules are left out
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": {"model": "vqlm_tiny", "model_overrides": {"activation_checkpointing": True}},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    out = tmp_path / "hf"
    subprocess.run(
        [sys.executable, "scripts/convert_checkpoint.py", str(tmp_path / "last.ckpt"), str(out)], check=True
    )
    converted = LVM.from_pretrained(out)
    assert torch.equal(our_logits(converted, ids), our_logits(model.eval(), ids))


def test_gradients_equal_hf(ids):
    """Our hand-written RMSNorm backward and rotary layout give HF's gradients, parameter by parameter."""
    hf = random_hf_llama().train()
    ours = LVM(LVMConfig.from_name("vqlm_tiny"))
    ours.load_state_dict(hf.state_dict())
    for logits in (ours(ids), hf(input_ids=ids).logits):
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        reference = hf_grads[name].grad
        assert (p.grad - reference).abs().max() <= 1e-4 * reference.abs().max(), name
