"""Bad inputs, fuzzed: each gets a clear message or a counted skip, never a hang or a silently wrong result.

Truncated and corrupt images, truncated tar shards (cut at every kind of offset), token ids out of
range, JSON of the wrong types, checkpoints carrying pickled code, configs with unknown keys or wrong
types, and videos that end early.
"""

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import ImageCrops
from data.shards import ShardStats, TokenRangeError, TokenSample, read_dataset_info, read_shard, write_shard
from data.sources import sentences_from_spec, video_frames
from lvm.faults import AtomicCheckpointIO

META = {"codebook_size": 64, "tokens_per_image": 4, "n_images": 1}


def shard(path, n=6, meta=META, high=64):
    rng = np.random.default_rng(0)
    samples = [TokenSample(f"s{i:04d}", rng.integers(0, high, (1, 4)).astype(np.uint16), meta) for i in range(n)]
    write_shard(path, samples)
    return path


# -- images ----------------------------------------------------------------------------------------------
def test_truncated_and_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    rng = random.Random(0)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(good)
    raw = good.read_bytes()
    bad = []
    for i in range(6):  # cut at random points, random bytes, an empty file
        path = tmp_path / f"bad{i}.png"
        path.write_bytes(raw[: rng.randrange(1, len(raw) - 20)] if i < 4 else bytes(rng.randrange(256) for _ in range(64)) if i == 4 else b"")
        bad.append(path)
    crops = ImageCrops([*bad, good], resolution=8, train=False)
    with caplog.at_level(logging.WARNING):
        out = [crops[i] for i in range(len(crops))]
    assert all(t.shape == (3, 8, 8) and torch.isfinite(t).all() for t in out)
    assert crops.failed == set(range(6))  # each bad file counted once, replaced by a readable one
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 6


# -- shards -----------------------------------------------------------------------------------------------
def test_shards_cut_at_any_offset_yield_whole_samples_and_count_the_shard(tmp_path):
    raw = shard(tmp_path / "full.tar").read_bytes()
    full = [s.key for s in read_shard(tmp_path / "full.tar", ShardStats())]
    for cut in sorted(random.Random(0).sample(range(1, len(raw)), 40)) + [512, 1024, len(raw) - 1024]:
        (tmp_path / "cut.tar").write_bytes(raw[:cut])
        stats = ShardStats()
        keys = [s.key for s in read_shard(tmp_path / "cut.tar", stats)]
        assert keys == full[: len(keys)], cut  # a prefix of whole samples, never garbage (a cut in the end padding loses none)
        if len(keys) < len(full):
            assert stats.corrupt_shards == 1, cut


def test_token_ids_out_of_range_raise_naming_the_sample(tmp_path):
    shard(tmp_path / "wide.tar", high=5000, meta={**META, "codebook_size": 8192})
    with pytest.raises(TokenRangeError, match=r"wide\.tar sample 's0000': token id \d+ >= codebook size 64"):
        list(read_shard(tmp_path / "wide.tar", ShardStats(), codebook_size=64))


@pytest.mark.parametrize("meta", [[1, 2], "text", 7, None])
def test_sample_json_of_the_wrong_type_is_a_counted_skip(tmp_path, meta):
    shard(tmp_path / "ok.tar", n=3)
    path = tmp_path / "bad.tar"
    samples = [TokenSample(f"s{i:04d}", np.zeros((1, 4), np.uint16), META if i != 1 else meta) for i in range(3)]
    write_shard(path, samples)
    stats = ShardStats()
    assert [s.key for s in read_shard(path, stats)] == ["s0000", "s0002"]
    assert stats.corrupt_samples == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"tokenizer": "vq", "codebook_size": "64", "tokens_per_image": 4}', "codebook_size must be int, found '64'"),
        ('{"tokenizer": "vq", "tokens_per_image": 4.0}', "codebook_size must be int, found None; tokens_per_image must be int"),
        ("[1, 2, 3]", "tokenizer must be str"),
        ('{"tokenizer": "vq",', "not valid JSON"),
    ],
)
def test_dataset_json_of_the_wrong_types_names_the_field(tmp_path, content, message):
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_dataset_info(tmp_path)


# -- checkpoints and configs --------------------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("where", ["state_dict", "hyper_parameters", "callbacks"])
def test_checkpoints_carrying_pickled_code_are_refused_wherever_it_hides(tmp_path, where):
    checkpoint = {"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {}, "callbacks": {}}
    checkpoint[where]["x"] = Payload()
    torch.save(checkpoint, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="pickled objects beyond tensors"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "x.ckpt")


def test_corrupt_checkpoint_bytes_are_refused_with_a_message(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "x.ckpt")
    raw = (tmp_path / "x.ckpt").read_bytes()
    for cut in (0, 10, len(raw) // 2, len(raw) - 10):
        (tmp_path / "cut.ckpt").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="not a readable torch checkpoint"):
            AtomicCheckpointIO().load_checkpoint(tmp_path / "cut.ckpt")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.init_args.no_such_option", "1"], "no_such_option"),
        (["--model.init_args.learning_rate", "fast"], "learning_rate"),
        (["--trainer.max_stepz", "3"], "max_stepz"),
        (["--data.init_args.batch_size", "[1]"], "batch_size"),
    ],
)
def test_configs_with_unknown_keys_or_wrong_types_name_the_key(args, message, capsys):
    from train import main

    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", "configs/lvm/demo.yaml", "--print_config", *args])
    assert stopped.value.code != 0
    assert message in capsys.readouterr().err


# -- videos -----------------------------------------------------------------------------------------------
def write_video(path, frames=12):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_videos_that_end_early_keep_their_frames_or_say_why(tmp_path, caplog):
    raw = write_video(tmp_path / "clip.mp4").read_bytes()
    counts = []
    for cut in (len(raw) // 4, len(raw) // 2, len(raw) * 3 // 4):
        (tmp_path / "cut.mp4").write_bytes(raw[:cut])
        try:
            counts.append(len(video_frames(tmp_path / "cut.mp4")))
        except ValueError as error:  # nothing decodable: said so, naming the file
            assert "cut.mp4" in str(error)
            counts.append(0)
    assert all(n <= 12 for n in counts)
    (tmp_path / "short").mkdir()
    short = write_video(tmp_path / "short" / "few.mp4", frames=3)
    with caplog.at_level(logging.WARNING):
        assert list(sentences_from_spec(f"video:{short.parent}", images_per_sentence=4)) == []
    assert any("few.mp4 has too few frames" in r.message for r in caplog.records)
    (tmp_path / "garbage.mp4").write_bytes(b"\0" * 1000)
    with pytest.raises((ValueError, OSError), match="garbage.mp4"):
        video_frames(tmp_path / "garbage.mp4")

