"""Compiled decoding (LVM.generate(compile=True)): the static cache and inductor-compiled step give the
eager path's tokens, are compiled once per shape and process, and follow weight updates. Compiling on
CPU takes tens of seconds, so everything shares one model and one batch shape."""

import gc
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from lvm import LVM, LVMConfig

CODEBOOK, VOCAB = 256, 356
pytestmark = pytest.mark.slow


def test_compiled_decoding_equals_eager_and_compiles_once():
    config = LVMConfig.from_name("vqlm_tiny", codebook_size=CODEBOOK, vocab_size=VOCAB)
    model = LVM(config).eval()
    ragged = [torch.randint(0, CODEBOOK, (n,)) for n in (7, 19, 1, 12)]

    def both(model, max_new_tokens=24, **kwargs):
        return [model.generate(ragged, max_new_tokens=max_new_tokens, compile=c, **kwargs) for c in (False, True)]

    eager, compiled = both(model, temperature=0)  # fp32 greedy, left-padded batch
    assert torch.equal(eager, compiled)
    graphs = counters["stats"]["unique_graphs"]
    # Sampling: same logits and generator, same draws. More new tokens: the cache length rounds up to the
    # same class, and the fed ids' strides change, which the compiled step (guards skipped) must not see.
    eager, compiled = both(model, max_new_tokens=30, top_k=20, seed=3)
    assert torch.equal(eager, compiled) and len(set(compiled.flatten().tolist())) > 20
    # The second call reused the compiled step: no new graph.
    assert counters["stats"]["unique_graphs"] == graphs

    with torch.no_grad():  # an optimizer step would change the weights in place, as this does
        for p in model.parameters():
            p.mul_(1.5)
    eager, compiled = both(model, temperature=0)
    assert torch.equal(eager, compiled)  # not the stale frozen weights

    # The kept decoders do not keep the model alive.
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
