"""Streaming packed rows: splitting across ranks and workers, resume, fill, long sentences, bad shards."""

import numpy as np
import pytest
import torch
from helpers import write_synthetic

from data.datamodule import STREAM_STATE, TokenDataModule
from data.packing import IGNORE_INDEX, Packer, collate_rows, cu_seqlens
from data.shards import claim_dataset_info

CODEBOOK = 1000
BOS, EOS = CODEBOOK, CODEBOOK + 1


def shard_set(directory, shards=8, per_shard=10, images=1, codebook_size=CODEBOOK, tokenizer="synthetic"):
    """Samples numbered 0..shards*per_shard-1, each `images` x 4 tokens equal to its number."""
    claim_dataset_info(directory, {"tokenizer": tokenizer, "codebook_size": codebook_size, "tokens_per_image": 4})
    for s in range(shards):
        write_synthetic(directory / f"shard-{s:06d}.tar", per_shard, codebook_size, images, first=s * per_shard)
    return str(directory)


def image_tokens(batches):
    """Counts of each sample number over all image tokens of the batches."""
    ids = torch.cat([b["input_ids"][b["labels"] != IGNORE_INDEX] for b in batches])
    return np.bincount(ids[ids < CODEBOOK].numpy(), minlength=CODEBOOK)


def consume(module, batches):
    """What Lightning does with each training batch before the step: the module records and untags it."""
    return [module.on_before_batch_transfer(b, 0) for b in batches]


def test_two_ranks_two_workers_see_every_sample_once(tmp_path):
    directory = shard_set(tmp_path, shards=8, per_shard=10, images=2)
    seen = []
    for rank in range(2):
        module = TokenDataModule(directory, seq_len=40, batch_size=2, num_workers=2, rank=rank, world_size=2)
        seen.append(image_tokens(consume(module, module.train_dataloader())))
    per_rank = [counts > 0 for counts in seen]
    assert not (per_rank[0] & per_rank[1]).any()  # no sample on both ranks
    total = seen[0] + seen[1]
    assert (total[:80] == 8).all() and total[80:].sum() == 0  # every sample once (2 images x 4 tokens)


def test_epochs_reshuffle_and_seed_determines_the_stream(tmp_path):
    directory = shard_set(tmp_path)
    module = TokenDataModule(directory, seq_len=24, batch_size=2, num_workers=0, shuffle_buffer=8)
    first = [b["input_ids"] for b in module.train_dataloader()]
    again = [b["input_ids"] for b in module.train_dataloader()]
    module.set_epoch(1)
    other = [b["input_ids"] for b in module.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(first), torch.cat(other))
    assert (image_tokens([{"input_ids": t, "labels": t} for t in other])[:80] == 4).all()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_k_batches_yields_the_remaining_batches(tmp_path, num_workers):
    directory = shard_set(tmp_path, shards=6, per_shard=12)
    options = dict(seq_len=30, batch_size=2, num_workers=num_workers, shuffle_buffer=5, seed=3)
    full = consume(TokenDataModule(directory, **options), TokenDataModule(directory, **options).train_dataloader())
    module = TokenDataModule(directory, **options)
    module.set_epoch(0)
    loader = iter(module.train_dataloader())
    head = consume(module, [next(loader) for _ in range(5)])
    state = module.state_dict()
    del loader
    resumed = TokenDataModule(directory, **options)
    resumed.load_state_dict(state)
    tail = consume(resumed, resumed.train_dataloader())
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full, strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    wrong = TokenDataModule(directory, **{**options, "num_workers": num_workers + 1})
    with pytest.raises(ValueError, match="same values"):
        wrong.load_state_dict(state)


def test_rows_are_full_and_carry_document_boundaries(tmp_path):
    directory = shard_set(tmp_path, shards=4, per_shard=25, images=3)
    module = TokenDataModule(directory, seq_len=64, batch_size=4, num_workers=0)
    batches = consume(module, module.train_dataloader())
    rows = [(b, i) for b in batches for i in range(len(b["input_ids"]))]
    fill = [(b["labels"][i] != IGNORE_INDEX).float().mean().item() for b, i in rows]
    assert min(fill[:-1]) >= 0.99 and fill[-1] > 0
    batch = batches[0]
    assert set(batch) == {"input_ids", "labels", "document_ids", "position_ids"}
    ids, docs, pos = batch["input_ids"][0], batch["document_ids"][0], batch["position_ids"][0]
    starts = torch.nonzero(ids == BOS).squeeze(1)
    assert (pos[starts] == 0).all() and (docs[starts] == torch.arange(len(starts)) + docs[0] + (pos[0] != 0)).all()
    bounds, longest = cu_seqlens(batch["document_ids"])
    assert bounds[0] == 0 and bounds[-1] == batch["input_ids"].numel() and longest <= 64
    last = batches[-1]
    padding = last["document_ids"] == -1
    assert padding.any() and (last["labels"][padding] == IGNORE_INDEX).all()


def test_long_sentences_split_at_image_boundaries_or_dropped():
    sentence = np.arange(5 * 4, dtype=np.uint16).reshape(5, 4)  # 5 images of 4 tokens = 22 with BOS/EOS
    packer = Packer(seq_len=16, bos_id=BOS, eos_id=EOS, cross_rows=False)
    rows = [*packer.add(sentence), *packer.flush()]
    documents = [r.input_ids[r.document_ids == d] for r in rows for d in np.unique(r.document_ids[r.document_ids >= 0])]
    assert [len(d) for d in documents] == [14, 10]  # 3 images + 2 images, each with BOS/EOS
    assert np.array_equal(np.concatenate([d[1:-1] for d in documents]), sentence.reshape(-1))
    assert packer.stats.split_sentences == 1
    dropper = Packer(seq_len=16, bos_id=BOS, eos_id=EOS, long_sentences="drop")
    assert not [*dropper.add(sentence), *dropper.flush()] and dropper.stats.dropped_sentences == 1


def test_whole_documents_mode_never_cuts_a_sentence():
    packer = Packer(seq_len=20, bos_id=BOS, eos_id=EOS, cross_rows=False)
    sentences = [np.full((n, 4), n, np.uint16) for n in (2, 3, 1, 4, 2)]
    rows = [r for s in sentences for r in packer.add(s)] + list(packer.flush())
    for row in rows:
        ids = row.input_ids[: row.length]
        assert ids[0] == BOS and ids[-1] == EOS and (ids == BOS).sum() == (ids == EOS).sum()
    batch = collate_rows(rows)
    assert batch["input_ids"].shape == (len(rows), 20) and (batch["labels"] == IGNORE_INDEX).any()


def test_validation_never_overlaps_training(tmp_path):
    directory = shard_set(tmp_path, shards=10, per_shard=4)
    module = TokenDataModule(directory, val_fraction=0.3, seq_len=24, batch_size=2, num_workers=0)
    train = image_tokens(consume(module, module.train_dataloader())) > 0
    val = image_tokens(list(module.val_dataloader())) > 0
    assert train.any() and val.any() and not (train & val).any() and (train | val)[:40].all()


def test_weights_repeat_rare_sets_and_tokenizers_cannot_mix(tmp_path):
    common = shard_set(tmp_path / "common", shards=4, per_shard=10)
    rare = shard_set(tmp_path / "rare", shards=2, per_shard=5)  # samples 0..9: counted on top of common's
    module = TokenDataModule({common: 1.0, rare: 3.0}, seq_len=24, batch_size=2, num_workers=0)
    counts = image_tokens(consume(module, module.train_dataloader()))
    assert (counts[:10] == 4 + 3 * 4).all() and (counts[10:40] == 4).all()
    other = shard_set(tmp_path / "other", shards=1, codebook_size=512, tokenizer="another")
    with pytest.raises(ValueError, match="different tokenizers"):
        TokenDataModule([common, other])


def test_corrupt_shard_is_skipped_and_counted_and_training_goes_on(tmp_path):
    directory = shard_set(tmp_path, shards=4, per_shard=10)
    raw = (tmp_path / "shard-000002.tar").read_bytes()
    (tmp_path / "shard-000002.tar").write_bytes(raw[: len(raw) // 3])
    module = TokenDataModule(directory, seq_len=24, batch_size=2, num_workers=0)
    counts = image_tokens(consume(module, module.train_dataloader()))
    assert module.skipped["corrupt_shards"] == 1
    assert (counts[:20] == 4).all() and (counts[30:40] == 4).all() and (counts[20:30] < 4).any()
    assert all(STREAM_STATE not in b for b in consume(module, module.train_dataloader()))


class Recorder(__import__("lightning").LightningModule):
    """Trains nothing; remembers the first token of every row it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        assert STREAM_STATE not in batch
        self.seen.append(batch["input_ids"].sum(1).tolist())
        return self.weight.sum() * 0 + self.weight.square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_lightning_checkpoint_resumes_mid_epoch(tmp_path):
    import lightning as L

    directory = shard_set(tmp_path / "shards", shards=4, per_shard=10)
    options = dict(seq_len=24, batch_size=2, num_workers=2, shuffle_buffer=4)

    def fit(max_steps=-1, ckpt_path=None):
        module = Recorder()
        # Saved at the end of step 7 (in epoch 1), as a preempted job's last checkpoint would be.
        every_7 = L.pytorch.callbacks.ModelCheckpoint(tmp_path / f"run{max_steps}", "mid", every_n_train_steps=7, save_top_k=-1)
        trainer = L.Trainer(max_steps=max_steps, max_epochs=2, callbacks=[every_7], logger=False, accelerator="cpu",
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(module, datamodule=TokenDataModule(directory, **options), ckpt_path=ckpt_path)
        return module.seen

    straight = fit()
    head = fit(max_steps=7)
    tail = fit(ckpt_path=tmp_path / "run7" / "mid.ckpt")
    assert len(head) == 7 and len(straight) > 7 and head + tail == straight
