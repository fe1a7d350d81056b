"""A tiny random transformers Janus (built offline, saved with save_pretrained) loaded into our pipeline:
understanding logits within 1e-4, greedy text equal token for token, greedy guided image codes equal to
transformers' image mode, decoded pixels within 1e-4, and our save_pretrained loading back into
transformers with the same codes and pixels."""

import json

import pytest
import torch
import transformers as T

from tokenizer import VQGAN
from vlm import VLM

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, EOS, BOS, IMAGE, BOI = 0, 1, 2, 100, 101
TEXT = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS)
# 16x16 images read as a 4x4 grid of patches; written as a 4x4 grid of codes (an 8x8 image, VQ f2)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
              projection_dim=32, depth=2, num_image_tokens=16, mlp_ratio=2.0)
VQ = dict(embed_dim=8, num_embeddings=64, latent_channels=16, base_channels=32, channel_multiplier=[1, 2],
          num_res_blocks=1, projection_dim=32, num_hidden_layers=2, image_token_embed_dim=32)


def _generation_kwargs(model):
    # transformers 5.24 drops generation_kwargs when it reads generation_config.json back, so its image mode
    # needs the begin-of-image id set again after from_pretrained (ours reads it from the file)
    model.generation_config.generation_kwargs = {"boi_token_id": BOI}
    return model


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    torch.manual_seed(0)
    hf = T.JanusForConditionalGeneration(
        T.JanusConfig(text_config=TEXT, vision_config=VISION, vq_config=VQ, image_token_id=IMAGE)).eval()
    hf.generation_config.pad_token_id, hf.generation_config.bos_token_id = PAD, BOS
    path = tmp_path_factory.mktemp("janus")
    _generation_kwargs(hf).save_pretrained(path)
    return _generation_kwargs(T.JanusForConditionalGeneration.from_pretrained(path).eval()), VLM.from_pretrained(path).eval(), path


def _understanding():
    """Two rows `text <image> x 16 text`, the second left-padded by 3 pads; pixels in [-1, 1] as Janus's processor."""
    text = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    image = torch.full((16,), IMAGE)
    full = torch.cat([text[0, :4], image, text[0, 4:]])
    short = torch.cat([torch.full((3,), PAD), text[1, :4], image, text[1, 4:7]])
    ids = torch.stack([full, short])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask, torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1


def _t2i():
    """`BOS caption BOI` rows, the second left-padded."""
    ids = torch.tensor([[BOS, 5, 6, 7, 8, BOI], [PAD, PAD, BOS, 9, 10, BOI]])
    return ids, (ids != PAD).long()


def test_janus_loads_as_our_pipeline(janus):
    _, ours, _ = janus
    assert ours.config.family == "janus" and ours.config.connector == "janus_mlp"
    assert type(ours.encoder.tower).__name__ == "JanusVisionModel"
    assert isinstance(ours.gen_tokenizer, VQGAN) and ours.codes_per_image == 16
    assert ours.config.generation["boi_token_id"] == BOI


def test_understanding_logits_and_greedy_text_match_transformers(janus):
    hf, ours, _ = janus
    ids, mask, pixels = _understanding()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        hf_new = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8,
                             do_sample=False)[:, ids.shape[1]:]
    our_new = ours.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8)
    assert our_new.tolist() == hf_new.tolist()


@pytest.mark.parametrize("scale", [5.0, 2.0])
def test_greedy_guided_codes_and_pixels_match_transformers(janus, scale):
    hf, ours, _ = janus
    ids, mask = _t2i()
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, generation_mode="image", do_sample=False,
                               guidance_scale=scale)
    codes = ours.generate_images(ids, attention_mask=mask, guidance_scale=scale, temperature=0.0)
    assert codes.tolist() == expected.tolist()
    assert len(set(codes.flatten().tolist())) > 2  # not a degenerate constant image
    with torch.no_grad():
        hf_pixels = hf.decode_image_tokens(codes).permute(0, 3, 1, 2)  # [B, H, W, 3] in [-1, 1]
    torch.testing.assert_close(ours.decode_images(codes), ((hf_pixels + 1) / 2).clamp(0, 1), atol=1e-4, rtol=0)


def test_vq_codebook_is_l2_normalised_at_lookup_as_transformers(janus):
    hf, ours, _ = janus
    codes = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        expected = hf.model.vqmodel.quantize.get_codebook_entry(codes)
    torch.testing.assert_close(ours.gen_tokenizer.quantize.lookup(codes, 4, 4), expected)
    assert ours.encode_images(torch.rand(2, 3, 8, 8)).shape == (2, 16)


def test_save_pretrained_loads_back_into_transformers(janus, tmp_path):
    hf, ours, source = janus
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["generation_kwargs"] == {"boi_token_id": BOI}
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    back = _generation_kwargs(T.JanusForConditionalGeneration.from_pretrained(tmp_path).eval())
    ids, mask = _t2i()
    codes = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, generation_mode="image", do_sample=False)
        assert back.generate(input_ids=ids, attention_mask=mask, generation_mode="image", do_sample=False).tolist() == \
            expected.tolist()
        torch.testing.assert_close(back.decode_image_tokens(codes), hf.decode_image_tokens(codes), atol=0, rtol=0)
    again = VLM.from_pretrained(tmp_path).eval()
    assert again.generate_images(ids, attention_mask=mask, temperature=0.0).tolist() == expected.tolist()


def test_a_janus_without_generation_config_says_what_is_missing(janus, tmp_path):
    import shutil

    _, _, source = janus
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, tmp_path / name)
    model = VLM.from_pretrained(tmp_path)
    ids, mask = _t2i()
    with pytest.raises(ValueError, match="needs boi_token_id .* generation_config.json"):
        model.generate_images(ids, attention_mask=mask)
