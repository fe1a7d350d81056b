"""Drawing with a VLM that writes images: text-to-image and in-context generation (EMU2).

    chat = Chat.load("runs/demo/unified/export", "runs/demo/vlm/tokenizer")
    images = draw(chat, ["a small red circle on the left on a plain white background"])            # PIL images
    images = draw(chat, [caption], examples=[(caption_1, image_1), (caption_2, image_2)])          # in context
    images = draw(chat, captions, candidates=4)     # the best of 4 per caption, judged by the model's own reading
    rounds = draw_candidates(chat, captions, 4)     # all 4: rounds[k][n], seeds 0..3; best_read(chat, rounds, captions)

The prompt is vlm.unified_data.image_prompt, the layout the model trained on: each example caption followed by
its image read through the connector, then the caption and `<begin_of_image>`; the model writes the codes with
classifier-free guidance (VLM.generate_images) and its VQ decodes them. scripts/prompt.py (--draw),
scripts/chat.py (/draw) and the web app's Draw tab call this.

With candidates k > 1 the model draws k images per caption (seeds seed .. seed + k - 1) and keeps the one
whose caption it reads back most likely (`caption_nll`: the caption after the image, as captions are trained).
DALL-E reranked its samples with CLIP; a model that reads and writes images is its own judge. An empty caption
gives nothing to judge by: the first candidate is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from vlm.chat import Chat


@torch.no_grad()
def draw(chat: Chat, captions: Sequence[str], examples: Sequence[tuple[str, Image.Image]] = (),
         guidance_scale: float = 5.0, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
         seed: int = 0, candidates: int = 1) -> list[Image.Image]:  # fmt: skip
    """One image per caption, drawn after the same (caption, image) examples; seeded, so repeatable. With
    candidates > 1, the best of that many by the model's own reading (module docstring)."""
    from tokenizer import to_pil
    from vlm.image_generation import NO_GENERATION_SIDE
    from vlm.unified_data import image_prompt

    if chat.vlm.config.generation is None:
        raise ValueError(NO_GENERATION_SIDE)
    if candidates != 1:
        rounds = draw_candidates(chat, captions, candidates, examples, seed=seed, guidance_scale=guidance_scale,
                                 temperature=temperature, top_k=top_k, top_p=top_p)  # fmt: skip
        return best_read(chat, rounds, captions)
    context = [caption for caption, _ in examples]
    pictures = [image for _, image in examples]
    generator = torch.Generator(chat.device).manual_seed(seed)
    drawn = []
    for start in range(0, len(captions), chat.batch_size):
        prompts = [chat.prompt_ids([{"role": "text", "content": image_prompt(caption, context)}], pictures, False)
                   for caption in captions[start : start + chat.batch_size]]  # fmt: skip
        input_ids, mask, pixels = chat.left_padded(prompts)
        codes = chat.vlm.generate_images(input_ids, attention_mask=mask, pixel_values=pixels,
                                         guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                                         top_p=top_p, generator=generator)  # fmt: skip
        drawn += to_pil(chat.vlm.decode_images(codes))
    return drawn


def draw_candidates(chat: Chat, captions: Sequence[str], candidates: int,
                    examples: Sequence[tuple[str, Image.Image]] = (), seed: int = 0, **sampling) -> list[list[Image.Image]]:
    """`candidates` rounds of `draw` (seeds seed .. seed + candidates - 1) -> images [k][n], round k for seed + k."""
    if candidates < 1:
        raise ValueError(f"candidates is the number of images drawn per caption, >= 1; got {candidates}")
    return [draw(chat, captions, examples, seed=seed + k, **sampling) for k in range(candidates)]


def best_read(chat: Chat, rounds: Sequence[Sequence[Image.Image]], captions: Sequence[str]) -> list[Image.Image]:
    """rounds [k][n] of images drawn for n captions -> per caption, the image with the lowest caption_nll."""
    scores = [caption_nll(chat, images, captions) for images in rounds]  # [k][n]
    return [rounds[min(range(len(rounds)), key=lambda k: scores[k][i])][i] for i in range(len(captions))]


@torch.no_grad()
def caption_nll(chat: Chat, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
    """The summed negative log-likelihood of each caption read after its image, in the layout captions are
    trained in (`<image>` newline caption, a document segment); 0.0 for an empty caption."""
    from data.packing import IGNORE_INDEX
    from vlm.filter import answer_nll

    documents = []
    for image, caption in zip(images, captions, strict=True):
        ids, pixels = chat.caption_prompt(image)
        answer = chat.tokenizer(caption, add_special_tokens=False)["input_ids"]
        documents.append((ids + answer, [IGNORE_INDEX] * len(ids) + answer, pixels))
    totals = []
    for start in range(0, len(documents), chat.batch_size):
        nll, _ = answer_nll(chat.vlm, documents[start : start + chat.batch_size], chat.pad_id)
        totals += nll.tolist()
    return totals
