"""Checkpoint files for every model of the stack: atomic writes, reading weights, checking them.

    with atomic_path(final) as tmp: ...        write tmp; it replaces `final` only if the block completes
    atomic_torch_save(obj, path)               torch.save through atomic_path
    read_state_dict(directory)                 model.safetensors, a sharded index, or pytorch_model.bin
    load_weights_only(path)                    torch.load(weights_only=True) with errors that say what to do
    check_state_dict(expected, state, source)  ValueError naming every missing / unexpected / reshaped tensor
    save_pretrained_dir(directory, config, tensors)   config.json + model.safetensors, each atomic

Only torch and safetensors are imported here: tokenizer/, data/, lvm/ and vlm/ all depend on this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


# -- atomic writes -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `final`; it replaces `final` only if the block completes.

    The file is flushed to disk before the rename and the directory after it, so a crash leaves either
    the old file or the new one, never a truncated one. On failure the temporary file is removed."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give the usual permissions
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, final)
        _fsync(final.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # directories cannot be opened on some platforms (Windows): nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save(obj, path), written atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# -- reading -------------------------------------------------------------------------------------------
def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF-style directory: model.safetensors, sharded safetensors (an index json), or
    the older pytorch_model.bin (loaded with weights_only=True), single or sharded."""
    directory = Path(directory)
    for name, load in (("model.safetensors", load_file), ("pytorch_model.bin", load_weights_only)):
        if (directory / name).exists():
            return load(directory / name)
        index = directory / f"{name}.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load(directory / shard).items()}
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or their sharded index in {directory}")


def load_weights_only(path: str | os.PathLike) -> dict:
    """torch.load(path, weights_only=True) on the CPU; a file it cannot read raises a ValueError that
    says why (not a torch file, or pickled objects beyond tensors) and what to do about it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch raises EOFError, KeyError, RuntimeError, ... for files it cannot read
        if not (isinstance(error, pickle.UnpicklingError) and "weights only load failed" in str(error).lower()):
            raise ValueError(
                f"{path} is not a readable torch checkpoint ({type(error).__name__}: {error}); "
                "expected a file written by torch.save"
            ) from error
        raise ValueError(
            f"{path} holds pickled objects beyond tensors, which weights_only loading refuses. If you trust "
            "the file, extract its weights once: torch.save({'state_dict': torch.load(p, weights_only=False)"
            f"['state_dict']}}, out) and load that. ({error})"
        ) from error


def check_state_dict(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str, *, hint: str = ""
) -> None:
    """Raise a ValueError naming every tensor of `state` that does not fit `expected` (a model's
    state_dict, meta tensors will do): missing, unexpected, or of another shape (both shapes given).
    `hint` ends the message: what the user probably did wrong."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    count = len(missing) + len(unexpected) + len(wrong_shape)
    if not count:
        return
    lines = (
        [f"missing: {k}" for k in missing]
        + [f"unexpected: {k}" for k in unexpected]
        + [f"wrong shape: {k}" for k in wrong_shape]
    )
    raise ValueError(
        f"{source} does not fit the model ({count} tensors differ)" + (f"; {hint}" if hint else "") + ":\n  "
        + "\n  ".join(lines)
    )


# -- writing -------------------------------------------------------------------------------------------
def save_pretrained_dir(
    directory: str | os.PathLike,
    config: dict,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `config.json` and `model.safetensors` (tensors moved to the CPU, made contiguous), each
    atomically, creating `directory` if needed. `metadata` joins safetensors' {"format": "pt"}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
    with atomic_path(directory / "config.json") as tmp:
        Path(tmp).write_text(json.dumps(config, indent=2))
