"""VLMDataModule + VLMModule: answers-only labels through the whole data path, stage freezing with and
without LoRA, the merged export, loss that falls, and an exact mid-epoch resume. Real parts throughout:
procedural-scene shards written by vlm.prepare, the embedded BPE tokenizer, a tiny CLIP + LVM VLM."""

import copy

import lightning as L
import pytest
import torch
from helpers import TINY_VLM_SPEC as VLM
from lightning.pytorch.callbacks import ModelCheckpoint

from vlm.data import VLMDataModule
from vlm.module import VLMModule
from vlm.prepare import prepare
from vlm.processing import ImageProcessor
from vlm.splice import IGNORE_INDEX
from vlm.text import load_text_tokenizer, train_default_tokenizer

DATA = dict(seq_len=192, batch_size=2, num_workers=0, shuffle_buffer=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    train_default_tokenizer(root / "tok")
    prepare(["scenes:24:train:32"], root / "train", shard_size=8, progress=False)
    prepare(["scenes:8:heldout:32"], root / "val", shard_size=8, progress=False)
    return root


def module_and_data(corpus, **options):
    module = VLMModule(vlm=copy.deepcopy(VLM), tokenizer=str(corpus / "tok"), warmup_steps=1, **options)
    data = VLMDataModule(str(corpus / "train"), tokenizer=str(corpus / "tok"), val=str(corpus / "val"), **DATA)
    return module, data


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(module, data, root, steps, ckpt_path=None, callbacks=()):
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[losses, *callbacks],
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return losses.losses


def test_batches_train_on_answers_only_and_carry_their_images(corpus):
    """Catches image positions or questions left in the loss, and tiles that do not match the placeholders."""
    module, data = module_and_data(corpus)
    data.set_processor(ImageProcessor.for_model(module.model))
    batch = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    ids, labels = batch["input_ids"], batch["labels"]
    image = module.model.config.image_token_id
    assert (labels[ids == image] == IGNORE_INDEX).all()
    per_tile = module.model.num_image_tokens((4, 4))
    assert int((ids == image).sum()) == batch["pixel_values"].shape[0] * per_tile
    assert int(batch["document_ids"].max()) >= 1, "several samples share a row"
    trained = load_text_tokenizer(corpus / "tok").decode(ids[labels != IGNORE_INDEX])
    assert "<|user|>" not in trained and "?" not in trained  # no user turn (the questions) in the loss


@pytest.mark.parametrize(("parts", "lora", "changed"), [
    (["connector"], None, {"connector"}),
    (["connector", "llm"], None, {"connector", "llm"}),
    (["encoder", "connector", "llm"], None, {"encoder", "connector", "llm"}),
    (["connector"], {"parts": ["llm"], "r": 4}, {"connector", "llm.lora"}),
], ids=["align", "pretrain", "sft", "lora"])
def test_one_step_changes_only_the_stage_parts(corpus, tmp_path, parts, lora, changed):
    module, data = module_and_data(corpus, train_parts=parts, lora=lora, learning_rate=1e-2)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit(module, data, tmp_path, steps=1)
    moved = set()
    for key, value in module.model.state_dict().items():
        if not torch.equal(value, before[key]):
            part = key.split(".")[0]
            moved.add(f"{part}.lora" if "lora_" in key else part)
    assert moved == changed


def test_merged_lora_export_gives_the_adapter_model_logits(corpus, tmp_path):
    from vlm import VLM as Model

    module, data = module_and_data(corpus, train_parts=["connector"], lora={"parts": ["llm"], "r": 4},
                                   learning_rate=1e-2, export_dir=str(tmp_path / "export"))
    fit(module, data, tmp_path, steps=3)
    exported = Model.from_pretrained(tmp_path / "export").eval()
    module.model.eval()
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, module.model(ids).logits, atol=1e-5, rtol=1e-5)


def test_loss_falls_and_resume_matches_a_straight_run(corpus, tmp_path):
    """Catches a data stream or optimiser state that a checkpoint does not restore."""
    torch.manual_seed(0)
    module, data = module_and_data(corpus, train_parts=["encoder", "connector", "llm"], learning_rate=3e-3,
                                   decay_steps=8)
    straight = fit(module, data, tmp_path / "a", steps=8)
    assert sum(straight[-3:]) < sum(straight[:3])
    torch.manual_seed(0)
    module, data = module_and_data(corpus, train_parts=["encoder", "connector", "llm"], learning_rate=3e-3,
                                   decay_steps=8)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    head = fit(module, data, tmp_path / "b", steps=4, callbacks=[checkpoints])
    torch.manual_seed(1)  # a different RNG state: the checkpoint must restore everything that matters
    module, data = module_and_data(corpus, train_parts=["encoder", "connector", "llm"], learning_rate=3e-3,
                                   decay_steps=8)
    tail = fit(module, data, tmp_path / "b", steps=8, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert head + tail == pytest.approx(straight, abs=1e-5)


def test_bad_configs_fail_before_compute(corpus, tmp_path):
    with pytest.raises(ValueError, match="unknown train_parts \\['vision'\\]"):
        VLMModule(vlm=copy.deepcopy(VLM), tokenizer=str(corpus / "tok"), train_parts=["vision"])
    with pytest.raises(FileNotFoundError, match="vlm.prepare"):
        VLMDataModule(str(tmp_path), tokenizer=str(corpus / "tok"))
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(corpus / "tok")
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "no_template")
    with pytest.raises(ValueError, match="chat template"):
        VLMDataModule(str(corpus / "train"), tokenizer=str(tmp_path / "no_template"))
