"""The VLM's generation side on our own models: codes in and code losses out of the training forward,
guided generation against teacher-forced logits, what the unconditional rows see, save/load, errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from vlm import VLM, VLMConfig
from vlm.image_generation import unconditional_ids

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, CODE, BOI, EOI, IMAGE = 0, 2, 92, 93, 94, 95
CLIP = {"kind": "hf", "config": dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)}
LVM_TEXT = {"kind": "lvm", "config": dict(name="text", vocab_size=96, codebook_size=0, hidden_size=48,
                                          intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                                          max_position_embeddings=256)}
HF_TEXT = {"kind": "hf", "config": dict(model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)}
# an 8x8 image in a 4x4 grid of codes: 16 codes per image, 64 in the codebook
VQ = dict(resolution=8, base_channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
          z_channels=16, embed_dim=8, codebook_size=64)
GENERATION = {"tokenizer": {"kind": "vqgan", "config": VQ}, "embed_dim": 8, "head_dim": 40, "boi_token_id": BOI,
              "eoi_token_id": EOI, "code_token_id": CODE, "bos_token_id": BOS, "pad_token_id": PAD}
T = 16


def unified(llm=LVM_TEXT, generation=GENERATION) -> VLM:
    torch.manual_seed(0)
    model = VLM(VLMConfig(encoder=CLIP, llm=llm, image_token_id=IMAGE, eos_token_id=1, pad_token_id=PAD,
                          generation=generation)).eval()
    with torch.no_grad():  # weights of unit gain: at the LLM init's scale every prompt gives the same codes
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and not name.startswith(("encoder", "gen_tokenizer")):
                weight.normal_(0, weight.shape[1] ** -0.5)
    return model


def prompts(captions=((5, 6, 7, 8, 9), (10, 11, 12))):
    """Left-padded rows `BOS caption BOI`."""
    rows = [torch.tensor([BOS, *c, BOI]) for c in captions]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


def written(ids, mask, codes):
    """Each prompt followed by its image's code placeholders and EOI (every row one sample, left-padded)."""
    tail = torch.cat([torch.full((ids.shape[0], T), CODE), torch.full((ids.shape[0], 1), EOI)], dim=1)
    return torch.cat([ids, tail], dim=1), torch.cat([mask, torch.ones_like(tail)], dim=1)


# -- the training forward ---------------------------------------------------------------------------------
def test_code_loss_is_read_before_each_code_and_text_loss_never_on_codes():
    model = unified()
    ids, mask = prompts()
    codes = torch.randint(0, 64, (2, T))
    full, full_mask = written(ids, mask, codes)
    labels = full.masked_fill(full_mask == 0, -100)  # every real position labelled, codes included
    out = model(full, attention_mask=full_mask, labels=labels, image_codes=codes)
    assert out.image_logits.shape == (2, T, 64)

    # by hand: the code at position p from gen_head(hidden[p - 1]); text targets exclude every code position
    embeds = model.embed_inputs(full)
    embeds[full == CODE] = model.gen_embed(codes).flatten(0, 1)
    hidden = model.llm.hidden(embeds, full_mask)
    start = ids.shape[1]  # the first code's column; the BOI before it predicts it
    expected = model.gen_head(hidden[:, start - 1 : start - 1 + T])
    torch.testing.assert_close(out.image_logits, expected)
    torch.testing.assert_close(out.image_loss, F.cross_entropy(expected.flatten(0, 1), codes.flatten()))
    text_targets = labels[:, 1:].masked_fill(full[:, 1:] == CODE, -100)
    assert CODE not in text_targets.tolist()[0] + text_targets.tolist()[1] and EOI in text_targets[0].tolist()
    text = F.cross_entropy(model.llm.head(hidden)[:, :-1].flatten(0, 1), text_targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.text_loss, text)
    torch.testing.assert_close(out.loss, out.text_loss + out.image_loss)


def test_a_generation_batch_has_no_text_loss_and_an_understanding_batch_no_code_loss():
    model = unified()
    ids, mask = prompts()
    full, full_mask = written(ids, mask, None)
    codes = torch.randint(0, 64, (2, T))
    out = model(full, attention_mask=full_mask, labels=torch.full_like(full, -100), image_codes=codes)
    assert out.text_loss is None and out.image_loss is not None
    assert out.loss is out.image_loss
    out.loss.backward()
    assert model.llm.model.lm_head.weight.grad is None  # no text target: the text head gets no gradient
    assert model.gen_head.vision_head.weight.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    text = torch.tensor([[BOS, IMAGE, *[IMAGE] * 15, 5, 6, 7]])
    out = model(text, pixel_values=torch.rand(1, 3, 32, 32), labels=text)
    assert out.image_loss is None and out.image_logits is None and out.loss is out.text_loss
    none_written = model(text, pixel_values=torch.rand(1, 3, 32, 32), labels=text, image_codes=torch.zeros(0, T).long())
    assert none_written.image_logits.shape == (0, T, 64) and none_written.image_loss is None
    out.loss.backward()
    assert all(p.grad is None for p in [*model.gen_head.parameters(), *model.gen_embed.parameters()])


def test_code_count_errors_name_the_problem():
    model = unified()
    ids, mask = prompts()
    full, full_mask = written(ids, mask, None)
    with pytest.raises(ValueError, match="image-code positions .id 92. but no image_codes"):
        model(full, attention_mask=full_mask)
    with pytest.raises(ValueError, match=r"image_codes must be \[n_images, 16\]"):
        model(full, attention_mask=full_mask, image_codes=torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="1 images of codes were given but the text's code positions take 2"):
        model(full, attention_mask=full_mask, image_codes=torch.zeros(1, T, dtype=torch.long))
    with pytest.raises(ValueError, match="sample 0: its text has 20 code positions, not a multiple of the 16"):
        model(torch.full((1, 21), CODE).index_fill(1, torch.tensor([0]), BOI), image_codes=torch.zeros(1, T, dtype=torch.long))


# -- guided generation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("llm", [LVM_TEXT, HF_TEXT], ids=["lvm", "hf"])
def test_scale_one_greedy_codes_are_the_conditional_argmax(llm):
    """Guidance 1.0 is the conditional model: each generated code is the argmax of the teacher-forced code
    logits of the same prompt (left-padded rows of different lengths, KV cache against full recompute)."""
    model = unified(llm)
    ids, mask = prompts()
    codes = model.generate_images(ids, attention_mask=mask, guidance_scale=1.0, temperature=0.0)
    assert codes.shape == (2, T) and codes.dtype == torch.long
    full, full_mask = written(ids, mask, codes)
    with torch.no_grad():
        teacher = model(full, attention_mask=full_mask, image_codes=codes).image_logits
    assert teacher.argmax(-1).tolist() == codes.tolist()


def test_guided_logits_mix_conditional_and_unconditional_rows():
    model = unified()
    ids, mask = prompts()
    scale = 3.0
    first = model.generate_images(ids, attention_mask=mask, guidance_scale=scale, temperature=0.0)[:, 0]
    with torch.no_grad():
        cond = model.gen_head(model.llm.hidden(model.embed_inputs(ids), mask)[:, -1])
        uncond = model.gen_head(model.llm.hidden(model.llm.embed(unconditional_ids(ids, model.config.generation)), mask)[:, -1])
    assert (uncond + scale * (cond - uncond)).argmax(-1).tolist() == first.tolist()


def test_unconditional_rows_see_no_caption_and_no_image():
    model = unified()
    ids, mask = prompts(((5, 6, 7, 8, 9), (10, 11, 12)))
    other, _ = prompts(((40, 41, 42, 43, 44), (50, 51, 52)))
    uncond = unconditional_ids(ids, model.config.generation)
    assert set(uncond[mask.bool()].tolist()) == {BOS, BOI, PAD}
    # guidance 0 keeps only the unconditional logits: captions and images then change nothing
    a = model.generate_images(ids, attention_mask=mask, guidance_scale=0.0, temperature=0.0)
    b = model.generate_images(other, attention_mask=mask, guidance_scale=0.0, temperature=0.0)
    assert a.tolist() == b.tolist()
    assert model.generate_images(other, attention_mask=mask, guidance_scale=1.0, temperature=0.0).tolist() != a.tolist()
    with_image = torch.tensor([[BOS, *[IMAGE] * 16, 5, 6, BOI]])
    seen = [model.generate_images(with_image, pixel_values=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)),
                                  guidance_scale=g, temperature=0.0) for g in (0.0, 1.0) for s in (1, 2)]
    assert seen[0].tolist() == seen[1].tolist()  # unconditional: the image is not read
    assert seen[2].tolist() != seen[3].tolist()  # conditional: it is


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = unified()
    ids, mask = prompts()
    run = lambda seed, **kw: model.generate_images(ids, attention_mask=mask, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert run(3).tolist() == run(3).tolist()
    assert run(3).tolist() != run(4).tolist()
    assert run(3, top_k=1).tolist() == model.generate_images(ids, attention_mask=mask, temperature=0.0).tolist()


# -- pixels, checkpoints, errors --------------------------------------------------------------------------
def test_encode_decode_and_save_load_round_trip(tmp_path):
    model = unified()
    images = torch.rand(2, 3, 8, 8)
    codes = model.encode_images(images)
    assert codes.shape == (2, T)
    pixels = model.decode_images(codes)
    assert pixels.shape == (2, 3, 8, 8) and 0 <= pixels.min() and pixels.max() <= 1
    ids, mask = prompts()
    model.save_pretrained(tmp_path / "unified")
    loaded = VLM.from_pretrained(tmp_path / "unified").eval()
    assert loaded.config == model.config
    assert loaded.generate_images(ids, attention_mask=mask, temperature=0.0).tolist() == \
        model.generate_images(ids, attention_mask=mask, temperature=0.0).tolist()
    torch.testing.assert_close(loaded.decode_images(codes), pixels, rtol=0, atol=0)

    reader = unified(generation=None)
    reader.save_pretrained(tmp_path / "reader")
    assert "generation" not in json.loads((tmp_path / "reader" / "config.json").read_text())
    assert not any(k.startswith("gen_") for k in reader.state_dict())
    # a reader given a generation side, its VQ model from a saved VQGAN directory, keeps what it had learned
    model.gen_tokenizer.save_pretrained(tmp_path / "vq")
    reader.add_generation({**GENERATION, "tokenizer": {"kind": "vqgan", "path": str(tmp_path / "vq")}})
    assert reader.config.generation["tokenizer"] == model.config.generation["tokenizer"]
    torch.testing.assert_close(reader.decode_images(codes), pixels, rtol=0, atol=0)
    reader.save_pretrained(tmp_path / "writer")
    assert VLM.from_pretrained(tmp_path / "writer").generate_images(ids, attention_mask=mask, temperature=0.0).shape == (2, T)


def test_bad_input_errors_name_the_problem():
    model = unified()
    ids, mask = prompts()
    with pytest.raises(ValueError, match=r"prompt rows \[0, 1\] do not end with the begin-of-image token \(id 93\)"):
        model.generate_images(ids[:, :-1], attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match=r"codes \[B, 16\] .* got shape \(2, 15\)"):
        model.decode_images(torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"images \[B, 3, 8, 8\] .* got \(1, 3, 16, 16\)"):
        model.encode_images(torch.rand(1, 3, 16, 16))
    reader = unified(generation=None)
    for call in (lambda: reader.generate_images(ids), lambda: reader.decode_images(torch.zeros(1, T, dtype=torch.long)),
                 lambda: reader.encode_images(torch.rand(1, 3, 8, 8))):
        with pytest.raises(ValueError, match="has no generation side .* load a checkpoint that has one"):
            call()
    with pytest.raises(ValueError, match=r"the generation spec lacks \['boi_token_id'\]"):
        unified(generation={k: v for k, v in GENERATION.items() if k != "boi_token_id"})
