"""The VLM pipeline on its own terms: splicing, the image processor, own-format checkpoints, cached
generation against a full recompute, and the errors bad input gets."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import VLM, VLMConfig
from vlm.processing import ImageProcessor
from vlm.splice import IGNORE_INDEX, expand_placeholders, mask_image_labels, splice

IMAGE = 95
CLIP = {"kind": "hf", "config": dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)}
LVM_TEXT = {"kind": "lvm", "config": dict(name="text", vocab_size=96, codebook_size=0, hidden_size=48,
                                          intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                                          max_position_embeddings=256)}


def tiny_vlm(**overrides) -> VLM:
    return VLM(VLMConfig(**{"encoder": CLIP, "llm": LVM_TEXT, "image_token_id": IMAGE, "eos_token_id": 1,
                            "pad_token_id": 0, **overrides})).eval()


# -- splicing ------------------------------------------------------------------------------------------
def test_features_land_exactly_at_the_placeholders():
    ids = torch.tensor([[5, IMAGE, IMAGE, 6, IMAGE, 7], [IMAGE, IMAGE, IMAGE, 8, 9, 10]])
    embeds = torch.zeros(2, 6, 4)
    images = [torch.full((2, 4), 1.0), torch.full((1, 4), 2.0), torch.full((3, 4), 3.0)]  # 3 images, 3 sizes
    out = splice(embeds, ids, images, IMAGE)
    assert out[0, :, 0].tolist() == [0, 1, 1, 0, 2, 0]
    assert out[1, :, 0].tolist() == [3, 3, 3, 0, 0, 0]
    labels = mask_image_labels(ids.clone(), ids, IMAGE)
    assert (labels == IGNORE_INDEX).tolist() == (ids == IMAGE).tolist()


def test_a_count_mismatch_names_the_sample_and_both_numbers():
    ids = torch.tensor([[5, IMAGE, IMAGE, 6], [IMAGE, IMAGE, IMAGE, 8]])
    with pytest.raises(ValueError, match="sample 1: its text has 3 <image> positions but its images give 2"):
        splice(torch.zeros(2, 4, 4), ids, [torch.ones(2, 4), torch.ones(2, 4)], IMAGE)
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        expand_placeholders([1, IMAGE, 2, IMAGE], IMAGE, [16])
    assert expand_placeholders([1, IMAGE, 2], IMAGE, [3]) == [1, IMAGE, IMAGE, IMAGE, 2]


# -- image processor -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiling", ["none", "internvl", "anyres", "catty"])
def test_processor_gives_the_token_counts_the_model_splices(tiling):
    model = tiny_vlm(connector="pixel_shuffle_mlp")
    processor = ImageProcessor.for_model(model, tiling=tiling, max_tiles=4)
    images = [Image.new("RGB", (64, 32), "red"), Image.fromarray(np.zeros((10, 1000), np.uint16), "I;16"),
              Image.new("RGBA", (1, 1)), Image.new("L", (40, 40))]
    out = processor(images)
    assert out.pixel_values.shape == (sum(out.tiles_per_image), 3, 32, 32)
    assert out.tokens_per_image == [n * 4 for n in out.tiles_per_image]  # (32/8)^2 patches / 4 (pixel shuffle)
    ids = torch.tensor([expand_placeholders([3, IMAGE, 4, IMAGE, IMAGE, IMAGE], IMAGE, out.tokens_per_image)])
    assert model(input_ids=ids, pixel_values=out.pixel_values).logits.shape[1] == ids.shape[1]


def test_processor_refuses_what_is_not_an_image():
    processor = ImageProcessor.for_model(tiny_vlm())
    with pytest.raises(TypeError, match="expected a PIL.Image.Image, got ndarray"):
        processor([np.zeros((4, 4, 3))])
    with pytest.raises(ValueError, match="unknown tiling 'tiles'; valid: none, internvl"):
        ImageProcessor(32, 16, tiling="tiles")


# -- own checkpoints and generation -----------------------------------------------------------------------
def _batch(model, lengths=(12, 7)):
    """Left-padded rows `text <image> text` of different lengths."""
    n = model.num_image_tokens((4, 4))
    rows = [torch.cat([torch.randint(3, 90, (2,)), torch.full((n,), IMAGE), torch.randint(3, 90, (k,))]) for k in lengths]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask, torch.rand(len(rows), 3, 32, 32)


def test_own_format_round_trip(tmp_path):
    model = tiny_vlm(connector="downsample_mlp")
    ids, mask, pixels = _batch(model)
    model.save_pretrained(tmp_path)
    loaded = VLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixels, mask).logits, model(ids, pixels, mask).logits, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("llm", ["lvm", "hf"])
def test_cached_greedy_generation_equals_full_recompute(llm):
    """Catches a cache written at the wrong slot, wrong positions for left-padded rows, or image tokens lost
    after the prefill: each new token must be the argmax of a full forward over everything so far."""
    hf_llm = {"kind": "hf", "config": dict(model_type="qwen2", vocab_size=96, hidden_size=48, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)}
    model = tiny_vlm(llm=LVM_TEXT if llm == "lvm" else hf_llm, eos_token_id=None)
    ids, mask, pixels = _batch(model)
    new = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=6)
    assert new.shape == (2, 6)
    for row in range(2):
        real = mask[row].bool()
        seq = ids[row][real][None]
        for step in range(6):
            with torch.no_grad():
                logits = model(seq, pixels[row : row + 1]).logits[0, -1]
            assert int(logits.argmax()) == int(new[row, step]), (row, step)
            seq = torch.cat([seq, new[row : row + 1, step : step + 1]], dim=1)


@pytest.mark.slow
def test_generation_stops_at_eos_and_pads_finished_rows():
    model = tiny_vlm()
    ids, mask, pixels = _batch(model)
    first = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=1)
    # declare row 0's first token the EOS: row 0 is finished at once and padded, row 1 runs to the end
    eos = int(first[0, 0])
    new = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=5, eos_token_id=eos)
    assert new[0, 0] == eos and (new[0, 1:] == 0).all()  # finished: the pad id after its EOS
    row1_finished = eos in new[1].tolist()
    assert new.shape[1] == (new[1].tolist().index(eos) + 1 if row1_finished else 5)
    streamed = []
    model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=3,
                   callback=lambda step, tokens: streamed.append(tokens.clone()))
    assert len(streamed) == 3


def test_bad_input_errors_name_the_problem(tmp_path):
    from vlm import connectors

    config = VLMConfig(encoder=CLIP, llm=LVM_TEXT, image_token_id=IMAGE)
    with pytest.raises(ValueError, match="outputs width 32 but the LLM's hidden size is 48"):
        VLM(config, connector=connectors.build("mlp2x_gelu", 32, 32))
    with pytest.raises(ValueError, match="does not take the vision encoder's width 32 .LLM hidden size 48"):
        VLM(config, connector=connectors.build("mlp2x_gelu", 64, 48))
    (tmp_path / "config.json").write_text('{"model_type": "blip-2"}')
    with pytest.raises(ValueError, match="unsupported model_type 'blip-2'; supported: 'lvm_vlm'.*'llava', 'internvl', 'idefics2'"):
        VLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_vlm()(torch.tensor([[3, IMAGE, 4]]))
