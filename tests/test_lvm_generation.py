"""LVM.generate: the KV cache equals recomputing the prefix, batches equal prompts alone, greedy equals
transformers' generate, sampling stays inside top-k / nucleus sets, special ids are never emitted,
seeds reproduce, the callback streams every token."""

import pytest
import torch
from transformers import LlamaForCausalLM

from lvm import LVM, LVMConfig

CODEBOOK, VOCAB = 256, 356  # 100 special ids after the image codes, as in LVM


def tiny(**overrides) -> LVM:
    config = LVMConfig.from_name("vqlm_tiny", codebook_size=CODEBOOK, vocab_size=VOCAB, **overrides)
    return LVM(config).eval()


def prompts(*lengths: int) -> list[torch.Tensor]:
    return [torch.randint(0, CODEBOOK, (n,)) for n in lengths]


def image_logits(model: LVM, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits [B, vocab] of the full prefixes, recomputed without a cache, specials at -inf."""
    with torch.no_grad():
        logits = model(ids)[:, -1]
    logits[:, CODEBOOK:] = float("-inf")
    return logits


def greedy_without_cache(model: LVM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    ids = prompt[None]
    for _ in range(new_tokens):
        ids = torch.cat([ids, image_logits(model, ids).argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.numel() :]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "lengths"), [("sdpa", (7, 19, 1, 12)), ("eager", (3, 9))])
def test_greedy_cache_equals_recompute_and_batch_equals_alone(backend, lengths):
    model = tiny(attn_backend=backend)
    batch = prompts(*lengths)
    new = model.generate(batch, max_new_tokens=12, temperature=0)
    assert new.shape == (len(lengths), 12) and new.dtype == torch.long
    for row, prompt in zip(new, batch, strict=True):
        assert torch.equal(row, greedy_without_cache(model, prompt, 12))
        assert torch.equal(row, model.generate([prompt], max_new_tokens=12, temperature=0)[0])
    # A [B, T] tensor is a batch of equal-length prompts.
    same_length = torch.stack(prompts(9, 9))
    assert torch.equal(model.generate(same_length, 5, temperature=0)[1], greedy_without_cache(model, same_length[1], 5))


@pytest.mark.slow
def test_greedy_equals_transformers_generate(tmp_path):
    tiny().save_pretrained(tmp_path)  # a random Llama in HF layout
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with torch.no_grad():  # norms at one would hide a norm mix-up
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    ours = LVM.from_pretrained(tmp_path)

    short, long = prompts(6, 11)
    ids = torch.zeros(2, 11, dtype=torch.long)
    ids[0, 5:], ids[1] = short, long
    attention_mask = (torch.arange(11) >= torch.tensor([[5], [0]])).long()  # left padding, as HF wants
    expected = hf.generate(
        ids,
        attention_mask=attention_mask,
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        suppress_tokens=list(range(CODEBOOK, VOCAB)),
        pad_token_id=0,
    )[:, 11:]
    assert torch.equal(ours.generate([short, long], max_new_tokens=20, temperature=0), expected)


def test_sampling_stays_in_top_k_and_nucleus():
    model = tiny()
    batch = torch.stack(prompts(10, 10, 10, 10)).repeat(100, 1)  # 4 prompts, 100 samples each
    logits = image_logits(model, batch[:4]).repeat(100, 1)

    top_k = model.generate(batch, max_new_tokens=1, top_k=5, seed=0)[:, 0]
    in_top_k = logits.topk(5).indices
    assert (in_top_k == top_k[:, None]).any(dim=1).all()
    assert len(set(top_k[::4].tolist())) > 1  # really sampled, not greedy

    top_p = 0.5
    nucleus = model.generate(batch, max_new_tokens=1, top_p=top_p, seed=0)[:, 0]
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely ids
    inside = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, before < top_p)
    assert inside.gather(1, nucleus[:, None]).all()
    assert inside.sum(1).max() < CODEBOOK / 2  # the nucleus is a real restriction here


@pytest.mark.slow
def test_special_ids_never_emitted_even_when_most_likely():
    model = tiny()
    head = torch.nn.Linear(model.config.hidden_size, VOCAB)  # the same head plus a bias
    with torch.no_grad():  # that makes every special id outscore every image code by far
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()[CODEBOOK:] = 1e4
    model.lm_head = head
    batch = prompts(5, 8)
    with torch.no_grad():
        assert (model(batch[0][None])[0, -1].topk(VOCAB - CODEBOOK).indices >= CODEBOOK).all()
    for kwargs in ({"temperature": 0}, {"temperature": 1.0}, {"top_k": 3}, {"top_p": 0.9, "temperature": 2.0}):
        assert model.generate(batch, max_new_tokens=12, seed=0, **kwargs).max() < CODEBOOK
    only = [3, 17, 200]
    sampled = model.generate(batch, max_new_tokens=30, seed=0, allowed_ids=only)
    assert set(sampled.flatten().tolist()) <= set(only)


def test_seed_reproduces_and_callback_streams_every_token():
    model = tiny()
    batch = prompts(4, 9)
    streamed = []
    first = model.generate(batch, max_new_tokens=10, top_k=50, seed=7, callback=lambda s, t: streamed.append((s, t)))
    assert torch.equal(first, model.generate(batch, max_new_tokens=10, top_k=50, seed=7))
    assert not torch.equal(first, model.generate(batch, max_new_tokens=10, top_k=50, seed=8))
    assert [s for s, _ in streamed] == list(range(10))
    assert torch.equal(torch.stack([t for _, t in streamed], dim=1), first)


def test_mode_dtype_and_lengths():
    model = tiny().train()
    assert model.generate(prompts(3), max_new_tokens=0).shape == (1, 0)
    assert model.generate(prompts(3), max_new_tokens=1, temperature=0).shape == (1, 1)
    assert model.training  # eval during generation, the caller's mode after


def test_bf16_generation_follows_the_fp32_model():
    """Catches a bf16 cache path that decodes garbage or a constant (ids inside the codebook are not
    enough): each greedy bf16 token is among the fp32 model's top 3 for the prefix it was generated from."""
    model = tiny()
    half = tiny().to(torch.bfloat16)
    half.load_state_dict(model.state_dict())  # the same weights, rounded to bf16
    batch = prompts(4, 6)
    new = half.generate(batch, max_new_tokens=6, temperature=0)
    assert new.dtype == torch.long
    for row, prompt in zip(new, batch, strict=True):
        ids = torch.cat([prompt, row])
        for t, token in enumerate(row.tolist()):
            top3 = image_logits(model, ids[None, : len(prompt) + t]).topk(3).indices[0].tolist()
            assert token in top3, (t, token, top3)


@pytest.mark.parametrize(
    ("prompt_ids", "kwargs", "message"),
    [
        ([], {}, "at least one prompt"),
        ([torch.tensor([], dtype=torch.long)], {}, "non-empty"),
        (torch.tensor([1, 2]), {}, r"\[B, T\]"),
        ([torch.tensor([VOCAB])], {}, "must lie in"),
        ([torch.tensor([1])], {"temperature": -1}, "temperature"),
        ([torch.tensor([1])], {"top_k": 0}, "top_k"),
        ([torch.tensor([1])], {"top_p": 0}, "top_p"),
        ([torch.tensor([1])], {"allowed_ids": [VOCAB]}, "allowed_ids"),
    ],
)
def test_bad_arguments(prompt_ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny().generate(prompt_ids, max_new_tokens=2, **kwargs)


def test_stop_ids_end_rows_and_embeddings_prompt_equals_ids():
    model = tiny()
    batch = prompts(5, 9)
    free = model.generate(batch, max_new_tokens=16, temperature=0)
    stop = int(free[0, 3])  # row 0 produces it at step 3 (and maybe row 1 somewhere)
    stopped = model.generate(batch, max_new_tokens=16, temperature=0, stop_ids=[stop])
    for row, full in zip(stopped, free, strict=True):
        hits = (full == stop).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 16
        assert torch.equal(row[:end], full[:end]) and (row[end:] == stop).all()  # repeats the stop id
    assert stopped.shape[1] == 16 or (stopped[:, -1] == stop).all()  # shorter only when every row stopped
    with pytest.raises(ValueError, match="stop_ids"):
        model.generate(batch, max_new_tokens=4, stop_ids=[VOCAB - 1])  # a special id is never produced

    embeds = [model.model.embed_tokens(p).detach() for p in batch]
    assert torch.equal(model.generate(None, max_new_tokens=16, temperature=0, inputs_embeds=embeds), free)
    with pytest.raises(ValueError, match="exactly one"):
        model.generate(batch, inputs_embeds=embeds)
