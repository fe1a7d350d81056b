"""UnifiedDataModule: understanding, generation and interleaved documents in one packed stream, read from
real procedural-scene shards (vlm.prepare) with the embedded BPE tokenizer and its generation markers."""

import numpy as np
import pytest
import torch

from vlm.prepare import prepare
from vlm.processing import ImageProcessor
from vlm.scenes import Scene
from vlm.splice import IGNORE_INDEX
from vlm.text import generation_token_ids, load_text_tokenizer, train_default_tokenizer
from vlm.unified_data import KINDS, UnifiedDataModule, check_mixture, image_prompt

RESOLUTION, N_CODES, TOKENS_PER_IMAGE = 32, 64, 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("unified")
    train_default_tokenizer(root / "tok")
    prepare(["scenes:24:train:32:multi"], root / "train", shard_size=8, progress=False)
    return root


def batches(corpus, count=4, **options):
    data = UnifiedDataModule(str(corpus / "train"), tokenizer=str(corpus / "tok"), seq_len=256, batch_size=4,
                             num_workers=0, shuffle_buffer=1, **options)
    data.set_processor(ImageProcessor(32, TOKENS_PER_IMAGE))
    data.set_generation(RESOLUTION, N_CODES)
    loader = iter(data.train_dataloader())
    return [data.on_before_batch_transfer(next(loader), 0) for _ in range(count)], load_text_tokenizer(corpus / "tok")


def documents(batch):
    """(row, ids, labels, kind) per document of the batch."""
    for b in range(batch["input_ids"].shape[0]):
        for doc in batch["document_ids"][b].unique().tolist():
            if doc >= 0:
                where = batch["document_ids"][b] == doc
                yield b, batch["input_ids"][b][where], batch["labels"][b][where], int(batch["kind_ids"][b][where][0])


def test_each_kind_trains_only_its_side(corpus):
    found, tokenizer = batches(corpus, mixture={"understanding": 1, "generation": 1, "interleaved": 1}, p_uncond=0.0)
    special = generation_token_ids(tokenizer)
    code, image = special["code_token_id"], tokenizer.convert_tokens_to_ids("<image>")
    seen, written = set(), 0
    for batch in found:
        for _, ids, labels, kind in documents(batch):
            seen.add(KINDS[kind])
            codes = int((ids == code).sum())
            assert not labels[ids == code].ne(IGNORE_INDEX).any()  # codes never carry a text label
            if KINDS[kind] == "understanding":
                assert codes == 0 and labels.ne(IGNORE_INDEX).any()
            elif KINDS[kind] == "generation":
                assert codes == N_CODES and labels.eq(IGNORE_INDEX).all()  # the image loss only
                assert (ids == special["boi_token_id"]).sum() == 1 and (ids == image).sum() == 0
            else:  # two context images read, one written; the captions trained
                assert codes == N_CODES and (ids == image).sum() == 2 * TOKENS_PER_IMAGE
                assert labels.ne(IGNORE_INDEX).sum() > 10
            written += codes // N_CODES
        assert batch["gen_pixels"].shape == ((batch["input_ids"] == code).sum() // N_CODES, 3, RESOLUTION, RESOLUTION)
        assert batch["pixel_values"].shape[0] * TOKENS_PER_IMAGE == (batch["input_ids"] == image).sum()
    assert seen == set(KINDS) and written > 0


def test_written_pixels_are_the_captioned_scene(corpus):
    """A generation document's caption and its written image come from the same scene."""
    found, tokenizer = batches(corpus, count=2, mixture={"generation": 1}, p_uncond=0.0)
    batch = found[0]
    boi = generation_token_ids(tokenizer)["boi_token_id"]
    written = [ids for _, ids, _, kind in documents(batch) if KINDS[kind] == "generation"]  # conversations: understanding
    assert len(written) == batch["gen_pixels"].shape[0] > 0
    for index, ids in enumerate(written):
        caption = tokenizer.decode(ids[1 : int((ids == boi).nonzero()[0])]).strip()
        seed = next(s for s in range(24) if Scene.random(s).caption() == caption)
        truth = torch.from_numpy(np.array(Scene.random(seed).render(RESOLUTION))).permute(2, 0, 1) / 255
        assert (batch["gen_pixels"][index] - truth).abs().mean() < 0.06  # 64 px PNG resized to 32 px


def test_conversations_share_skips_the_rest(corpus):
    """conversations=0 keeps only caption samples (a generation-only stream); 1 keeps every conversation."""
    kinds = {}
    for share in (0.0, 1.0):
        found, _ = batches(corpus, count=2, mixture={"generation": 1}, p_uncond=0.0, conversations=share)
        kinds[share] = [KINDS[kind] for batch in found for *_, kind in documents(batch)]
    assert set(kinds[0.0]) == {"generation"} and len(kinds[0.0]) > 4
    assert "understanding" in kinds[1.0]
    with pytest.raises(ValueError, match="conversations is the share"):
        UnifiedDataModule(str(corpus / "train"), tokenizer=str(corpus / "tok"), conversations=1.5)


def test_dropped_captions_leave_bos_and_begin_of_image(corpus):
    found, tokenizer = batches(corpus, count=2, mixture={"generation": 1}, p_uncond=0.999)
    boi = generation_token_ids(tokenizer)["boi_token_id"]
    written = [ids for _, ids, _, kind in documents(found[0]) if KINDS[kind] == "generation"]
    assert written
    for ids in written:
        at = int((ids == boi).nonzero()[0])
        assert ids[0] == tokenizer.bos_token_id and (ids[1:at] == tokenizer.pad_token_id).all() and at > 3


def test_image_prompt_and_bad_settings(corpus):
    assert image_prompt("a red circle", ["a blue square"]) == "a blue square\n<image>\na red circle\n<begin_of_image>"
    assert check_mixture({"generation": 3, "understanding": 1})["generation"] == 0.75
    with pytest.raises(ValueError, match="unknown mixture kinds.*valid kinds"):
        check_mixture({"t2i": 1.0})
    with pytest.raises(ValueError, match="p_uncond"):
        UnifiedDataModule(str(corpus / "train"), tokenizer=str(corpus / "tok"), p_uncond=1.0)
