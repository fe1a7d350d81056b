"""Attention backends: agreement with the eager reference, block-diagonal masks for packed rows (no
leaks across documents), padding without NaNs, xformers masks, and `auto`'s choice."""

import logging
import sys

import pytest
import torch

from data.packing import Packer, collate_rows
from lvm import LVM, LVMConfig
from lvm import attention as A

TOL = 1e-5


def packed_batch(config: LVMConfig):
    """Two rows packed by data.packing: documents of 1-3 'images' of 4 tokens, some padding."""
    packer = Packer(seq_len=32, bos_id=config.bos_id, eos_id=config.eos_id, cross_rows=False)
    rows = []
    for n_images in (2, 3, 1, 3, 1):
        rows += packer.add(torch.randint(0, config.codebook_size, (n_images, 4)).numpy().astype("uint16"))
    rows += packer.flush()
    batch = collate_rows(rows[:2])
    assert (batch["document_ids"] == -1).any() and (batch["document_ids"] == 1).any()
    return batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LVM(LVMConfig.from_name("vqlm_tiny", vocab_size=300, codebook_size=256)).eval()


def logits(model, backend, batch=None, ids=None):
    model.config.attn_backend = backend
    with torch.no_grad():
        if batch is None:
            return model(ids)
        return model(batch["input_ids"], batch["position_ids"], batch["document_ids"])


def test_block_causal_mask():
    documents = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = A.block_causal_mask(documents, 6, torch.device("cpu"))[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],  # padding sees itself: no empty softmax row
        ]
    )
    assert torch.equal(mask, expected)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backends_match_eager(model, backend):
    ids = torch.randint(0, 300, (2, 32))
    assert (logits(model, backend, ids=ids) - logits(model, "eager", ids=ids)).abs().max() < TOL
    batch = packed_batch(model.config)
    packed = logits(model, backend, batch)
    assert not packed.isnan().any()
    assert (packed - logits(model, "eager", batch)).abs().max() < TOL
    # the packed mask matters: plain causal attention over the same row gives other logits
    assert (packed - logits(model, backend, ids=batch["input_ids"])).abs().max() > 1e-2


@pytest.mark.slow
def test_sdpa_gradients_match_eager():
    ids = torch.randint(0, 300, (2, 32))
    documents = torch.tensor([[0] * 12 + [1] * 14 + [-1] * 6, [0] * 32])
    grads = []
    for backend in ("eager", "sdpa"):
        torch.manual_seed(3)
        model = LVM(LVMConfig.from_name("vqlm_tiny", vocab_size=300, codebook_size=256, attn_backend=backend))
        model(ids, document_ids=documents).square().mean().backward()
        grads.append(model.model.layers[0].self_attn.k_proj.weight.grad)
    assert (grads[0] - grads[1]).abs().max() < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_row_equals_documents_alone(model, backend):
    batch = packed_batch(model.config)
    packed = logits(model, backend, batch)
    for row in range(2):
        documents = batch["document_ids"][row]
        for doc in documents[documents >= 0].unique():
            where = documents == doc
            alone = logits(model, backend, ids=batch["input_ids"][row, where][None])[0]
            assert (packed[row, where] - alone).abs().max() < TOL


def test_no_attention_leak(model):
    batch = packed_batch(model.config)
    before = logits(model, "sdpa", batch)
    changed = {k: v.clone() for k, v in batch.items()}
    first = changed["document_ids"][0] == 0
    changed["input_ids"][0, first] = torch.randint(0, 256, (int(first.sum()),))
    after = logits(model, "sdpa", changed)
    assert (after[0, first] - before[0, first]).abs().max() > 1e-2
    assert torch.equal(after[0, ~first], before[0, ~first])
    assert torch.equal(after[1], before[1])


def test_flex_refuses_cpu_training():
    model = LVM(LVMConfig.from_name("vqlm_tiny", attn_backend="flex"))
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        model(torch.randint(0, 100, (1, 8)))


def test_auto_falls_back_to_sdpa_and_says_why(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    A._xformers_probe.cache_clear()
    A._auto.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="lvm.attention"):
            assert A.resolve_backend("auto", torch.device("cpu")) == "sdpa"
        assert "sdpa (xformers not installed)" in caplog.text
        with pytest.raises(RuntimeError, match="xformers not installed"):
            A.resolve_backend("xformers", torch.device("cpu"))
    finally:
        A._xformers_probe.cache_clear()
        A._auto.cache_clear()


def test_auto_with_xformers_on_cpu(caplog):
    pytest.importorskip("xformers.ops")
    A._xformers_probe.cache_clear()
    A._auto.cache_clear()
    with caplog.at_level(logging.INFO, logger="lvm.attention"):
        assert A.resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert "xformers has no CPU kernels" in caplog.text


def test_xformers_masks_equal_sdpa_masks(model):
    pytest.importorskip("xformers.ops")
    batch = packed_batch(model.config)
    documents = batch["document_ids"]
    rows, length = documents.shape
    # block-diagonal over the flattened batch; its diagonal blocks are each row's mask
    dense = A.xformers_bias(documents).materialize((rows * length, rows * length)).isfinite()
    sdpa = A.block_causal_mask(documents, length, torch.device("cpu"))
    for row in range(rows):
        span = slice(row * length, (row + 1) * length)
        assert torch.equal(dense[span, span], sdpa[row, 0])
        assert not dense[span, (row + 1) * length :].any()  # nothing across rows
    causal = A.xformers_bias(None).materialize((length, length)).isfinite()
    assert torch.equal(causal, A.block_causal_mask(None, length, torch.device("cpu"))[0, 0])
