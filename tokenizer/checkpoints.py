"""Loading VQGAN weights: our own directories, taming-transformers checkpoints, open-muse folders.

    our directory      config.json ("model_type": "lvm-vqgan") + model.safetensors
    taming run         <run>/checkpoints/*.ckpt beside <run>/configs/*-project.yaml (training logs), or
                       <run>/ckpts/last.ckpt beside <run>/configs/model.yaml (the released models), or
                       x.ckpt beside x.yaml; a bare .ckpt has its shape read off the state dict
    open-muse folder   config.json (VQGANModel fields) + pytorch_model.bin or model.safetensors

taming and open-muse use the same module names as our VQGAN, so weights load without renaming; what
differs is where the shape is written and the pixel range (taming [-1, 1], open-muse [0, 1]).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import yaml

from lvm.checkpoints import check_state_dict, load_weights_only, read_state_dict
from tokenizer.config import VQGANConfig
from tokenizer.model import VQGAN

EXPECTED = (
    "a directory written by VQGAN.save_pretrained (config.json + model.safetensors), "
    "a taming-transformers .ckpt or run directory (checkpoints/*.ckpt or ckpts/*.ckpt, with "
    "configs/*-project.yaml or configs/model.yaml), "
    "or an open-muse VQGAN directory (config.json + pytorch_model.bin)"
)


def load_pretrained(path: str | os.PathLike, **overrides) -> VQGAN:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no VQGAN checkpoint at {path}; expected {EXPECTED}")
    if path.is_file():
        if path.suffix == ".ckpt":
            return _load_taming(path, overrides)
        raise ValueError(f"{path} is a {path.suffix or 'suffix-less'} file; expected {EXPECTED}")
    config_file = path / "config.json"
    if config_file.exists():
        values = json.loads(config_file.read_text())
        if values.get("model_type") == "lvm-vqgan":
            config = VQGANConfig.from_dict({**values, **overrides})
            return _build(config, read_state_dict(path), str(path))
        if "hidden_channels" in values and "num_embeddings" in values:
            return _load_muse(path, values, overrides)
        raise ValueError(
            f"{config_file} is neither our VQGAN config nor an open-muse VQGANModel config; expected {EXPECTED}"
        )
    ckpt = _find_taming_checkpoint(path)
    if ckpt is not None:
        return _load_taming(ckpt, overrides)
    raise ValueError(f"{path} holds no VQGAN checkpoint; expected {EXPECTED}")


def _build(config: VQGANConfig, state_dict: dict[str, torch.Tensor], source: str) -> VQGAN:
    model = VQGAN(config)
    check_state_dict(model.state_dict(), state_dict, source, hint=f"read as the VQGAN shape {config.name!r} ({config})")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


# -- taming-transformers -------------------------------------------------------------------------------
_TAMING_CKPT_DIRS = ("checkpoints", "ckpts")  # training logs / the released downloads


def _find_taming_checkpoint(run: Path) -> Path | None:
    for sub in _TAMING_CKPT_DIRS:
        checkpoints = sorted((run / sub).glob("*.ckpt")) if (run / sub).is_dir() else []
        if checkpoints:
            last = [c for c in checkpoints if c.name == "last.ckpt"]
            return (last or checkpoints)[-1]
    return None


def _find_taming_config(ckpt: Path) -> Path | None:
    """The YAML describing `ckpt`: `<stem>.yaml` beside it (how taming's notebooks store downloads), else,
    for a checkpoint inside a run folder, the newest `configs/*-project.yaml` (taming writes one per
    start or resume) or `configs/model.yaml` (the released models). None for a bare checkpoint."""
    if ckpt.with_suffix(".yaml").is_file():
        return ckpt.with_suffix(".yaml")
    if ckpt.parent.name not in _TAMING_CKPT_DIRS:
        return None
    configs = ckpt.parent.parent / "configs"
    projects = sorted(configs.glob("*-project.yaml"))
    if projects:
        return projects[-1]
    return configs / "model.yaml" if (configs / "model.yaml").is_file() else None


def _load_taming(ckpt: Path, overrides: dict) -> VQGAN:
    checkpoint = load_weights_only(ckpt)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{ckpt} is not a taming-transformers Lightning checkpoint (no 'state_dict'); expected {EXPECTED}"
        )
    state_dict = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("loss.")}
    if "quantize.embed.weight" in state_dict:
        raise ValueError(
            f"{ckpt} is a Gumbel-quantized taming model, which is not supported (VectorQuantizer2 only)"
        )
    if "quantize.used" in state_dict:
        raise ValueError(f"{ckpt} uses taming's index remapping ('quantize.used'), which is not supported")
    project = _find_taming_config(ckpt)
    if project is not None:
        name = ckpt.stem if project.parent == ckpt.parent else ckpt.parent.parent.name
        config = _config_from_taming_yaml(project, {"name": name, **overrides})
    else:
        config = _config_from_state_dict(state_dict, overrides)
    config.extra = {"source": "taming", "checkpoint": str(ckpt), "project": str(project) if project else None}
    return _build(config, state_dict, str(ckpt))


def _config_from_taming_yaml(project: Path, overrides: dict) -> VQGANConfig:
    try:
        params = yaml.safe_load(project.read_text())["model"]["params"]
        dd = params["ddconfig"]
    except (KeyError, TypeError, yaml.YAMLError) as error:
        raise ValueError(
            f"{project} is not a taming-transformers VQModel config (model.params.ddconfig missing: {error!r})"
        ) from error
    if params.get("remap"):
        raise ValueError(f"{project} configures index remapping (remap), which is not supported")
    values = dict(
        name=project.stem,
        resolution=dd["resolution"],
        in_channels=dd["in_channels"],
        base_channels=dd["ch"],
        channel_mult=dd["ch_mult"],
        num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=dd["attn_resolutions"],
        mid_attention=True,
        z_channels=dd["z_channels"],
        embed_dim=params["embed_dim"],
        codebook_size=params["n_embed"],
        dropout=dd.get("dropout", 0.0),
        pixel_range=(-1.0, 1.0),
    )
    return VQGANConfig(**{**values, **overrides})


def _config_from_state_dict(state_dict: dict[str, torch.Tensor], overrides: dict) -> VQGANConfig:
    """Read the shape off tensor sizes. The resolution is not recorded anywhere: 256 unless overridden,
    and attention resolutions are placed relative to it."""
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    base = state_dict["encoder.conv_in.weight"].shape[0]
    resolution = overrides.get("resolution", 256)
    res_blocks = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))
    }
    values = dict(
        name="taming-inferred",
        resolution=resolution,
        in_channels=state_dict["encoder.conv_in.weight"].shape[1],
        base_channels=base,
        channel_mult=[state_dict[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // base for i in levels],
        num_res_blocks=len(res_blocks),
        attn_resolutions=[
            resolution // 2**i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state_dict
        ],
        mid_attention="encoder.mid.attn_1.q.weight" in state_dict,
        z_channels=state_dict["encoder.conv_out.weight"].shape[0],
        embed_dim=state_dict["quant_conv.weight"].shape[0],
        codebook_size=state_dict["quantize.embedding.weight"].shape[0],
        pixel_range=(-1.0, 1.0),
    )
    return VQGANConfig(**{**values, **overrides})


# -- open-muse -----------------------------------------------------------------------------------------
_MUSE_UNSUPPORTED = {
    "decoder_res_blocks": None,
    "extra_mid_res_blocks": None,
    "decoder_hidden_channels": None,
    "decoder_channel_mult": None,
    "resample_with_conv": True,
}


def _load_muse(directory: Path, values: dict, overrides: dict) -> VQGAN:
    different = {
        k: values[k] for k, default in _MUSE_UNSUPPORTED.items() if values.get(k, default) != default
    }
    if different:
        raise ValueError(
            f"open-muse options {different} in {directory} change the architecture and are not supported"
        )
    if values.get("attn_resolutions") and values.get("num_res_blocks", 2) < 2:
        # open-muse applies block attention only when a level holds more than one attention block
        raise ValueError(
            f"{directory}: open-muse attention with num_res_blocks < 2 skips its attention; not supported"
        )
    config = VQGANConfig(
        **{
            **dict(
                name=directory.name,
                resolution=values.get("resolution", 256),
                in_channels=values.get("num_channels", 3),
                base_channels=values["hidden_channels"],
                channel_mult=values.get("channel_mult", (1, 1, 2, 2, 4)),
                num_res_blocks=values.get("num_res_blocks", 2),
                attn_resolutions=values.get("attn_resolutions", (16,)),
                mid_attention=not values.get("no_attn_mid_block", False),
                z_channels=values.get("z_channels", 256),
                embed_dim=values.get("quantized_embed_dim", 256),
                codebook_size=values["num_embeddings"],
                commitment=values.get("commitment_cost", 0.25),
                dropout=values.get("dropout", 0.0),
                pixel_range=(0.0, 1.0),
                extra={"source": "open-muse", "checkpoint": str(directory)},
            ),
            **overrides,
        }
    )
    try:
        state_dict = read_state_dict(directory)
    except FileNotFoundError:
        raise ValueError(
            f"{directory} has an open-muse config.json but no pytorch_model.bin or model.safetensors"
        ) from None
    return _build(config, state_dict, str(directory))
