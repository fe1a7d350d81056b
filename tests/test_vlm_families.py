"""Tiny random LLaVA, InternVL and Idefics2 models built with transformers, loaded into our pipeline:
logits within 1e-4 of transformers', greedy generation equal token for token, and save_pretrained
loading back into transformers with equal logits."""

import pytest
import torch
import transformers as T

from vlm import VLM

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, eos_token_id=1, pad_token_id=0, bos_token_id=2)
IMAGE_TOKEN = 100


def llava():
    config = T.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, **VISION),
        text_config=dict(model_type="llama", **TEXT), image_token_id=IMAGE_TOKEN)
    return T.LlavaForConditionalGeneration(config), 16, dict(pixel_values=torch.rand(2, 3, 32, 32))


def internvl():
    config = T.InternVLConfig(
        vision_config=dict(image_size=[32, 32], patch_size=[8, 8], **VISION),
        text_config=dict(model_type="qwen2", **TEXT), image_token_id=IMAGE_TOKEN)
    return T.InternVLForConditionalGeneration(config), 4, dict(pixel_values=torch.rand(2, 3, 32, 32))


def idefics2():
    config = T.Idefics2Config(
        vision_config=dict(image_size=32, patch_size=8, **VISION),
        perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4,
                              resampler_head_dim=8, num_key_value_heads=2),
        text_config=dict(model_type="mistral", **TEXT), image_token_id=IMAGE_TOKEN)
    # one image per sample; the second one padded at the bottom (Idefics2's pixel mask)
    pixel_mask = torch.ones(2, 1, 32, 32, dtype=torch.long)
    pixel_mask[1, :, 24:] = 0
    pixels = torch.rand(2, 1, 3, 32, 32) * pixel_mask[:, :, None]
    return T.Idefics2ForConditionalGeneration(config), 4, dict(pixel_values=pixels, pixel_attention_mask=pixel_mask)


def _inputs(tokens_per_image: int):
    """Two rows `text <image> x n text`, the second shorter and left-padded by 3 pad tokens."""
    text = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    image = torch.full((tokens_per_image,), IMAGE_TOKEN)
    full = torch.cat([text[0, :4], image, text[0, 4:]])
    short = torch.cat([torch.zeros(3, dtype=torch.long), text[1, :4], image, text[1, 4:7]])
    ids = torch.stack([full, short])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.slow
@pytest.mark.parametrize("build", [llava, internvl, idefics2], ids=["llava", "internvl", "idefics2"])
def test_family_matches_transformers(build, tmp_path):
    torch.manual_seed(0)
    hf, tokens_per_image, images = build()
    hf.eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = VLM.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.family == hf.config.model_type
    ids, mask = _inputs(tokens_per_image)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, **images).logits
        got = ours(input_ids=ids, attention_mask=mask, **images).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        hf_new = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **images)[:, ids.shape[1]:]
    our_new = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, temperature=0.0, **images)
    assert our_new.tolist() == hf_new.tolist()

    ours.save_pretrained(tmp_path / "ours")
    back = T.AutoModelForImageTextToText.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        reloaded = back(input_ids=ids, attention_mask=mask, **images).logits
    torch.testing.assert_close(reloaded[real], expected[real], atol=1e-5, rtol=1e-5)
