"""lvm.checkpoints: the one checkpoint helper module of the stack (atomic writes, reading, checking)."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from lvm.checkpoints import (
    atomic_path,
    atomic_torch_save,
    check_state_dict,
    load_weights_only,
    read_state_dict,
    save_pretrained_dir,
)


def test_atomic_path_replaces_only_on_success(tmp_path):
    """Catches a writer that truncates the old file before the new one is complete, or leaks temp files."""
    final = tmp_path / "metrics.json"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")
    assert final.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]

    with atomic_path(final) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert final.read_text() == "new" and os.listdir(tmp_path) == ["metrics.json"]
    umask = os.umask(0)
    os.umask(umask)
    # mkstemp's private 0600 would make shared run directories unreadable to colleagues
    assert stat.S_IMODE(final.stat().st_mode) == 0o666 & ~umask


def test_atomic_torch_save_round_trips(tmp_path):
    """Catches a save that writes nothing or something torch.load(weights_only=True) refuses."""
    obj = {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "step": 3}
    atomic_torch_save(obj, tmp_path / "x.ckpt")
    loaded = load_weights_only(tmp_path / "x.ckpt")
    assert loaded["step"] == 3 and torch.equal(loaded["state_dict"]["w"], obj["state_dict"]["w"])


def test_load_weights_only_explains_unreadable_files(tmp_path):
    """Catches a raw unpickling traceback reaching the user instead of what the file is and what to do."""
    (tmp_path / "text.bin").write_bytes(b"")  # an interrupted download
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_weights_only(tmp_path / "text.bin")
    torch.save({"opaque": object()}, tmp_path / "pickled.bin")
    with pytest.raises(ValueError, match="weights_only"):
        load_weights_only(tmp_path / "pickled.bin")


def test_check_state_dict_names_every_problem():
    """Catches a check that stops at the first problem or omits the shapes a user needs to see."""
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    state = {"a": torch.zeros(3, 3), "b": torch.zeros(4), "d": torch.zeros(1)}
    with pytest.raises(ValueError) as info:
        check_state_dict(expected, state, "ckpt.safetensors", hint="wrong preset?")
    message = str(info.value)
    assert "ckpt.safetensors" in message and "3 tensors differ" in message and "wrong preset?" in message
    assert "missing: c" in message and "unexpected: d" in message
    assert "wrong shape: a: checkpoint (3, 3) vs model (2, 3)" in message
    assert "b" not in message.split(":\n", 1)[1]  # tensors that fit are not listed
    check_state_dict(expected, dict(expected), "same")  # a fitting state dict passes


def test_save_pretrained_dir_and_read_state_dict(tmp_path):
    """Catches a saved directory that does not read back bit for bit, and sharded checkpoints being ignored."""
    tensors = {"w": torch.randn(3, 4).t(), "b": torch.arange(3, dtype=torch.bfloat16)}  # w non-contiguous
    save_pretrained_dir(tmp_path / "m", {"model_type": "x", "n": 3}, tensors, metadata={"note": "hi"})
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == {"model_type": "x", "n": 3}
    back = read_state_dict(tmp_path / "m")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"w": tensors["w"].contiguous()}, sharded / "model-00001-of-00002.safetensors")
    save_file({"b": tensors["b"]}, sharded / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    back = read_state_dict(sharded)
    assert torch.equal(back["w"], tensors["w"]) and torch.equal(back["b"], tensors["b"])

    torch.save({"w": tensors["w"]}, tmp_path / "pytorch_model.bin")
    assert torch.equal(read_state_dict(tmp_path)["w"], tensors["w"])
    assert load_file(tmp_path / "m" / "model.safetensors").keys() == tensors.keys()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        read_state_dict(tmp_path / "m" / "nothing")
