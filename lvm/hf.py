"""HF Llama checkpoints <-> LVM, and Lightning training checkpoints -> LVM.

Our parameter names are LlamaForCausalLM's and our rotary layout is its rotate_half one, so weights
move without renaming or permuting; what lives here is the config.json mapping and the loading order;
lvm.checkpoints reads the files (single or sharded) and checks names and shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lvm.checkpoints import check_state_dict, read_state_dict, save_pretrained_dir
from lvm.config import LVMConfig
from lvm.model import LVM, Rotary

# Keys some HF checkpoints carry that are computed, not learned.
_COMPUTED = ("rotary_emb.inv_freq",)


# -- config.json -----------------------------------------------------------------------------------------
def config_to_hf(config: LVMConfig, dtype: torch.dtype) -> dict:
    """LlamaConfig fields (transformers 4.x reads rope_theta, 5.x rope_parameters: both are written),
    plus our codebook_size and preset name, which transformers keeps as plain attributes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "initializer_range": config.init_std,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        "dtype": str(dtype).removeprefix("torch."),
        "codebook_size": config.codebook_size,
        "lvm_preset": config.name,
    }


def config_from_hf(hf: dict, **overrides) -> LVMConfig:
    """An LVMConfig from a Llama config.json; refuses Llama variants this model does not implement."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") not in ("silu", "swish"),
        "attention_bias": bool(hf.get("attention_bias")),
        "mlp_bias": bool(hf.get("mlp_bias")),
        "rope scaling": rope.get("rope_type", rope.get("type", "default")) != "default",
        "head_dim": hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
        != hf["hidden_size"] // hf["num_attention_heads"],
    }
    if any(unsupported.values()):
        raise ValueError(f"unsupported Llama variant ({', '.join(k for k, v in unsupported.items() if v)}): {hf}")
    vocab = hf["vocab_size"]
    values = dict(
        name=hf.get("lvm_preset", "custom"),
        vocab_size=vocab,
        # Plain Llama configs do not say where image codes end: LVM's 8192 codes, or all but BOS/EOS.
        codebook_size=hf.get("codebook_size", min(8192, vocab - 2)),
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        init_std=hf.get("initializer_range", 0.02),
    )
    return LVMConfig(**{**values, **overrides})


# -- weights -----------------------------------------------------------------------------------------------
def load_state_dict_into(model: LVM, state: dict[str, torch.Tensor], source: str) -> LVM:
    """Check names and shapes against the model, then load; a mismatch lists every offending tensor."""
    state = {k: v for k, v in state.items() if not k.endswith(_COMPUTED)}
    check_state_dict(model.state_dict(), state, source, hint=f"read as {model.config}")
    model.load_state_dict(state, assign=True)
    # Built on the meta device to skip a useless random init; the rotary table is computed, not loaded.
    model.rotary = Rotary(model.config.head_dim, model.config.rope_theta)
    return model


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, **overrides) -> LVM:
    """LVM from an HF Llama directory; weights cast to `dtype`, or kept as stored with dtype="auto"."""
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    config = config_from_hf(hf, **overrides)
    state = read_state_dict(path)
    if "lm_head.weight" not in state and hf.get("tie_word_embeddings"):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # ours are untied: copy
    if dtype != "auto":
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = LVM(config)
    return load_state_dict_into(model, state, str(path))


def save_pretrained(model: LVM, directory: str | os.PathLike) -> None:
    """config.json + model.safetensors, each written atomically, that LlamaForCausalLM loads."""
    dtype = model.lm_head.weight.dtype
    save_pretrained_dir(directory, config_to_hf(model.config, dtype), model.state_dict())


# -- Lightning checkpoints ---------------------------------------------------------------------------------
def load_lightning_checkpoint(path: str | os.PathLike, config: LVMConfig | None = None) -> LVM:
    """The LVM held as `self.model` by a LightningModule: its state-dict keys are `model.` + ours.
    Without `config`, it comes from the checkpoint's hyper_parameters (see `config_from_hparams`)."""
    with torch.serialization.safe_globals([LVMConfig]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = config or config_from_hparams(checkpoint.get("hyper_parameters", {}))
    if config is None:
        raise ValueError(f"{path}: no LVM config in hyper_parameters; pass one (a preset name or LVMConfig)")
    prefix = "model."  # other prefixes (a distillation teacher, metrics) are not the trained model
    state = {k.removeprefix(prefix): v.float() for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = LVM(config)
    return load_state_dict_into(model, state, str(path))


def config_from_hparams(hparams: dict) -> LVMConfig | None:
    """LVMModule's hyper-parameters (`model` preset name + `model_overrides`, or `init_from` an HF
    directory), or a `config` entry holding an LVMConfig or its fields; None when there is neither."""
    # Older checkpoints kept the training switch activation_checkpointing among the model overrides.
    overrides = {k: v for k, v in (hparams.get("model_overrides") or {}).items() if k != "activation_checkpointing"}
    if hparams.get("init_from"):
        hf = json.loads((Path(hparams["init_from"]) / "config.json").read_text())
        return config_from_hf(hf, **overrides)
    if isinstance(hparams.get("model"), str):
        return LVMConfig.from_name(hparams["model"], **overrides)
    config = hparams.get("config")
    return LVMConfig.from_dict(config) if isinstance(config, dict) else config
