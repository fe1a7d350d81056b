"""VLM speed against transformers' LlavaForConditionalGeneration with the same weights, in one run.

    python bench/vlm.py [--repeats 3] [--threads 2] [--batch 4] [--new-tokens 64]

A LLaVA-1.5-shaped model, small enough for a CPU: a CLIP ViT of 12 layers x 384 on 224 px images
(patch 14: 256 image tokens), the mlp2x_gelu projector, a Llama of 8 layers x 512 (vocab 32000).
transformers builds it with random weights and saves it; our VLM loads that directory (the Llama runs
on our LVM transformer, the CLIP tower stays transformers').
- train: forward + backward of `batch` samples of 256 image tokens + 128 text tokens, loss on the text;
  tokens/s over all positions.
- decode: one image + 32 text tokens, greedy, `new_tokens` new tokens (the same tokens as transformers,
  checked); decode tokens/s = (new - 1) / (whole - prefill), prefill timed as generating one token.
Runs are interleaved (ours, HF, ours, ..) and the best of `repeats` kept, so machine noise hits both alike.
The last line is JSON: train_ratio_vs_hf, decode_ratio_vs_hf.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm import VLM  # noqa: E402

IMAGE_TOKEN = 31999


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def build(directory: str):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                           num_attention_heads=6, image_size=224, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, vocab_size=32000, max_position_embeddings=1024, eos_token_id=2),
        image_token_id=IMAGE_TOKEN,
    )
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    hf = LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="sdpa")
    return hf, VLM.from_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        hf, ours = build(directory)

    def sample(batch: int, text: int):
        ids = torch.cat([torch.randint(3, 31000, (batch, 4)), torch.full((batch, 256), IMAGE_TOKEN),
                         torch.randint(3, 31000, (batch, text - 4))], dim=1)
        return ids, torch.ones_like(ids), torch.rand(batch, 3, 224, 224)

    ids, mask, pixels = sample(args.batch, 128)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)

    def train(model, loss_of):
        def step():
            model.zero_grad(set_to_none=True)
            loss_of(model).backward()
        return step

    train_steps = {
        "ours": train(ours.train(), lambda m: m(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss),
        "transformers": train(hf.train(), lambda m: m(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss),
    }
    prompt_ids, prompt_mask, prompt_pixels = sample(1, 32)

    def decode(model, n):
        if model is ours:
            return lambda: ours.generate(input_ids=prompt_ids, pixel_values=prompt_pixels, attention_mask=prompt_mask,
                                         max_new_tokens=n, eos_token_id=[])
        return lambda: hf.generate(input_ids=prompt_ids, pixel_values=prompt_pixels, attention_mask=prompt_mask,
                                   max_new_tokens=n, min_new_tokens=n, do_sample=False)

    ours.eval(), hf.eval()
    with torch.inference_mode():
        same = torch.equal(decode(ours, args.new_tokens)(), decode(hf, args.new_tokens)()[:, prompt_ids.shape[1]:])

    best = {name: {"train": float("inf"), "prefill": float("inf"), "whole": float("inf")} for name in train_steps}
    for _ in range(args.repeats):
        for name, model in (("ours", ours), ("transformers", hf)):
            model.train()
            best[name]["train"] = min(best[name]["train"], best_time(train_steps[name], 1))
            model.eval()
            with torch.inference_mode():
                best[name]["prefill"] = min(best[name]["prefill"], best_time(decode(model, 1), 1))
                best[name]["whole"] = min(best[name]["whole"], best_time(decode(model, args.new_tokens), 1))

    train_tokens = ids.numel()
    print(f"LLaVA-shaped: CLIP 12x384 (256 image tokens) + Llama 8x512; {args.threads} threads, best of {args.repeats}")
    print(f"{'':14}{'train tok/s':>12}{'prefill s':>11}{'decode tok/s':>14}")
    rate = {}
    for name, t in best.items():
        rate[name] = (train_tokens / t["train"], (args.new_tokens - 1) / (t["whole"] - t["prefill"]))
        print(f"{name:14}{rate[name][0]:12.0f}{t['prefill']:11.3f}{rate[name][1]:14.1f}")
    print(f"same greedy tokens: {same}")
    print(json.dumps({
        "bench": "vlm",
        "train_ratio_vs_hf": round(rate["ours"][0] / rate["transformers"][0], 2),
        "decode_ratio_vs_hf": round(rate["ours"][1] / rate["transformers"][1], 2),
        "same_tokens": same,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
