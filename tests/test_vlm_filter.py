"""vlm.filter: the per-sample scorer equals the model's own loss, batching and padding change no score, a
killed run resumes without rescoring, corrupt samples are counted, and a small VLM trained in the test on
true captions keeps >= 90% true captions when half the captions are moved to the wrong scene."""

import copy
import csv
import io
import math
import tarfile

import lightning as L
import pytest
import torch
from helpers import TINY_VLM_SPEC as SPEC

from data.shards import list_shards
from vlm.data import VLMDataModule, sample_document
from vlm.filter import SCORES_FILE, filter_shards, iter_scores, main, mean_answer_nll
from vlm.model import VLM
from vlm.module import VLMModule, new_config
from vlm.prepare import iter_shard_samples, prepare, read_manifest
from vlm.processing import ImageProcessor
from vlm.text import load_text_tokenizer, train_default_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("filter")
    train_default_tokenizer(root / "tok")
    prepare(["scenes:6:heldout:32"], root / "mixed", shard_size=8, progress=False)  # captions and questions
    prepare(["scenes:40:heldout:32:none:0.5"], root / "noisy", shard_size=16, progress=False)
    return root


def tiny_vlm(corpus) -> VLM:
    torch.manual_seed(0)
    return VLM(new_config(copy.deepcopy(SPEC), str(corpus / "tok")))


def test_scores_are_the_models_loss_per_sample_whatever_the_batch(corpus):
    """Catches a shifted label, padding that leaks into a score, or a mean over the wrong tokens."""
    model, tokenizer = tiny_vlm(corpus).eval(), load_text_tokenizer(corpus / "tok")
    processor = ImageProcessor.for_model(model)
    shard = list_shards(corpus / "mixed")[0]
    samples = list(iter_shard_samples(shard))
    expected = []
    with torch.no_grad():
        for sample, images in samples:
            ids, labels, pixels = sample_document(tokenizer, processor, sample, images)
            loss = model(torch.as_tensor(ids)[None], pixels, labels=torch.as_tensor(labels)[None]).loss
            expected.append(float(loss))
    one = [mean for _, _, mean in iter_scores(model, tokenizer, corpus / "mixed", batch_size=1, limit=len(samples))]
    five = [mean for _, _, mean in iter_scores(model, tokenizer, corpus / "mixed", batch_size=5, limit=len(samples))]
    assert one == pytest.approx(expected, abs=1e-5)
    assert five == pytest.approx(expected, abs=1e-5)
    assert {s["kind"] for s, _ in samples} == {"caption", "conversation"}


def test_resume_skips_scored_keys_and_corrupt_samples_are_counted(corpus, tmp_path):
    model, tokenizer = tiny_vlm(corpus), load_text_tokenizer(corpus / "tok")
    source = tmp_path / "in"
    prepare(["scenes:4:heldout:32"], source, shard_size=8, progress=False)
    shard = list_shards(source)[0]
    with tarfile.open(shard) as tar:  # corrupt the first sample's image
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"not a png" if member.name.endswith(".0.png") and member.name.startswith("000000000") else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    total = read_manifest(source)["samples"]
    out = tmp_path / "out"
    first = filter_shards(model, tokenizer, source, out, keep=0.5, batch_size=4, progress=False)
    assert first["skipped_this_run"] == {"corrupt_image": 1} and first["scored"] == total - 1
    with open(out / SCORES_FILE) as file:
        lines = file.readlines()
    (out / SCORES_FILE).write_text("".join(lines[:4]) + lines[4][:7])  # killed after 3 rows, mid-row
    second = filter_shards(model, tokenizer, source, out, keep=0.25, batch_size=4, progress=False)
    rows = list(csv.DictReader(open(out / SCORES_FILE)))
    assert len(rows) == total - 1 and len({r["key"] for r in rows}) == total - 1  # rescored only what was lost
    assert second["kept"] == round(0.25 * (total - 1)) == read_manifest(out)["samples"]
    kept_ids = sorted(s["id"] for p in list_shards(out) for s, _ in iter_shard_samples(p))
    best = sorted(rows, key=lambda r: float(r["mean_nll"]))[: second["kept"]]
    assert kept_ids == sorted(r["id"] for r in best)
    assert all(math.isclose(float(r["perplexity"]), math.exp(float(r["mean_nll"])), rel_tol=1e-6) for r in rows)
    data = VLMDataModule(str(out), tokenizer=str(corpus / "tok"), seq_len=192, batch_size=2, num_workers=0)
    data.set_processor(ImageProcessor.for_model(model))  # the kept set trains as any prepared set
    assert next(iter(data.train_dataloader()))["pixel_values"].shape[0] >= 1


def test_bad_inputs_name_the_fix(corpus, tmp_path, capsys):
    model, tokenizer = tiny_vlm(corpus), load_text_tokenizer(corpus / "tok")
    with pytest.raises(ValueError, match="fraction of samples to keep"):
        filter_shards(model, tokenizer, corpus / "noisy", tmp_path / "o", keep=1.5)
    with pytest.raises(ValueError, match="new directory"):
        filter_shards(model, tokenizer, corpus / "noisy", corpus / "noisy")
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "model"), "--tokenizer", str(corpus / "tok"), "--shards", str(tmp_path),
              "--out", str(tmp_path / "o")])
    assert "python -m vlm.prepare" in capsys.readouterr().err


@pytest.mark.slow
def test_keeping_half_keeps_true_captions(corpus, tmp_path):
    """A small VLM trained on true captions of training scenes finds the wrong captions of held-out scenes
    less plausible: keeping the likelier half keeps >= 90% true ones (half of the input is true).
    (400 steps: at 250 this model keeps 16 of 20, at 350 19 of 20.)"""
    prepare(["scenes:1000:train:32:none"], tmp_path / "train", shard_size=256, progress=False)
    spec = copy.deepcopy(SPEC)  # wider than SPEC and 4 px patches (16 image tokens): it learns to see in 400 steps
    spec["encoder"]["config"].update(patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    spec["llm"]["config"].update(hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    module = VLMModule(vlm=spec, tokenizer=str(corpus / "tok"), train_parts=["encoder", "connector", "llm"],
                       learning_rate=2e-3, warmup_steps=10)  # fmt: skip
    data = VLMDataModule(str(tmp_path / "train"), tokenizer=str(corpus / "tok"), seq_len=192, batch_size=8, num_workers=0)
    L.Trainer(accelerator="cpu", max_steps=400, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path).fit(module, datamodule=data)  # fmt: skip
    model, tokenizer = module.model, load_text_tokenizer(corpus / "tok")
    summary = filter_shards(model, tokenizer, corpus / "noisy", tmp_path / "kept", keep=0.5, progress=False)
    truth = [s["caption_true"] for p in list_shards(corpus / "noisy") for s, _ in iter_shard_samples(p, decode=False)]
    kept = [s["caption_true"] for p in list_shards(tmp_path / "kept") for s, _ in iter_shard_samples(p, decode=False)]
    assert sum(truth) == 20 and summary["kept"] == len(kept) == 20
    assert sum(kept) / len(kept) >= 0.9
    assert mean_answer_nll(model, tokenizer, tmp_path / "kept") < mean_answer_nll(model, tokenizer, corpus / "noisy")
