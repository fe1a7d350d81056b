"""Asking a VLM about images, and scoring its answers.

    chat = Chat(model, tokenizer)                       # the model's image processor and chat template
    answers = chat.answer(images, questions)            # greedy, batched, stops at end of turn
    captions = chat.caption(images)
    exact_match(answers, truths), token_f1(captions, truths)

`score_scenes` is the demo's evaluation on held-out procedural scenes: QA exact match for the model, for the
same model shown a blank image, and for the best blind answer (the majority answer per question type);
caption token F1 for the model and the blank image; a PNG grid of image | question | answer | truth.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlm.processing import ImageProcessor
from vlm.splice import expand_placeholders


class Chat:
    def __init__(self, model, tokenizer, processor: ImageProcessor | None = None, batch_size: int = 32):
        from vlm.text import IMAGE_TOKEN, check_tokenizer

        self.model, self.tokenizer = model.eval(), tokenizer
        self.processor = processor or ImageProcessor.for_model(model)
        self.image_id = check_tokenizer(tokenizer)
        self.image_token = IMAGE_TOKEN
        self.batch_size = batch_size

    def prompt_ids(self, turns: list[dict], images: list[Image.Image], generation_prompt: bool = True):
        """-> (ids with placeholders expanded, pixel tiles) for one prompt."""
        from vlm.text import encode_turns

        ids, _ = encode_turns(self.tokenizer, turns, add_generation_prompt=generation_prompt, eos=False)
        processed = self.processor(images)
        return expand_placeholders(ids, self.image_id, processed.tokens_per_image), processed.pixel_values

    @torch.no_grad()
    def generate(self, prompts: list[tuple[list[int], torch.Tensor]], max_new_tokens: int, **options) -> list[str]:
        """Greedy continuations of (ids, pixels) prompts, batched with left padding -> decoded texts."""
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            pad = self.tokenizer.pad_token_id or 0
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in chunk])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in chunk])
            pixels = torch.cat([p for _, p in chunk])
            new = self.model.generate(input_ids=input_ids, pixel_values=pixels, attention_mask=mask,
                                      max_new_tokens=max_new_tokens, temperature=0.0, **options)
            texts += [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
        return texts

    def answer(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 6) -> list[str]:
        prompts = [self.prompt_ids([{"role": "user", "content": f"{self.image_token}\n{q}"}], [image])
                   for image, q in zip(images, questions, strict=True)]
        return self.generate(prompts, max_new_tokens)

    def caption(self, images: list[Image.Image], max_new_tokens: int = 24) -> list[str]:
        prompts = [self.prompt_ids([{"role": "text", "content": f"{self.image_token}\n"}], [image], generation_prompt=False)
                   for image in images]
        return self.generate(prompts, max_new_tokens, eos_token_id=self.tokenizer.eos_token_id)


# -- metrics ---------------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def exact_match(predictions: list[str], truths: list[str]) -> float:
    return sum(normalize(p) == normalize(t) for p, t in zip(predictions, truths, strict=True)) / max(len(truths), 1)


def token_f1(predictions: list[str], truths: list[str]) -> float:
    """Mean bag-of-words F1 (SQuAD's): overlap of word counts between prediction and truth."""
    scores = []
    for prediction, truth in zip(predictions, truths, strict=True):
        p, t = normalize(prediction).split(), normalize(truth).split()
        common = sum((collections.Counter(p) & collections.Counter(t)).values())
        scores.append(0.0 if not common else 2 * common / (len(p) + len(t)))
    return sum(scores) / max(len(scores), 1)


# -- the demo's scene evaluation ---------------------------------------------------------------------------
def score_scenes(chat: Chat, count: int, size: int = 64, grid_path: Path | None = None, grid_rows: int = 12) -> dict:
    from vlm import scenes

    images, questions, truths, types, captions = [], [], [], [], []
    scene_images = []
    for seed in scenes.scene_seeds("heldout", count):
        image, caption, qa = scenes.scene_sample(seed, size)
        scene_images.append(image)
        captions.append(caption)
        for qa_type, question, answer in qa:
            images.append(image), questions.append(question), truths.append(answer), types.append(qa_type)
    blank = Image.new("RGB", (size, size), (128, 128, 128))
    model_answers = chat.answer(images, questions)
    blank_answers = chat.answer([blank] * len(questions), questions)
    majority = scenes.majority_answers()
    blind = [majority[t] for t in types]
    model_captions = chat.caption(scene_images)
    blank_captions = chat.caption([blank] * len(scene_images))
    per_type = {
        t: {name: exact_match([a for a, k in zip(answers, types, strict=True) if k == t], [a for a, k in zip(truths, types, strict=True) if k == t])
            for name, answers in (("model", model_answers), ("blank_image", blank_answers), ("text_only", blind))}
        for t in sorted(set(types))
    }
    if grid_path is not None:
        save_qa_grid(grid_path, images[:grid_rows], questions[:grid_rows], model_answers[:grid_rows], truths[:grid_rows])
    return {
        "qa_exact_match": {"model": exact_match(model_answers, truths), "blank_image": exact_match(blank_answers, truths),
                           "text_only": exact_match(blind, truths)},
        "qa_exact_match_per_type": per_type,
        "caption_f1": {"model": token_f1(model_captions, captions), "blank_image": token_f1(blank_captions, captions)},
        "count": len(questions),
        "captions": len(captions),
        "examples": [{"question": q, "answer": a, "truth": t} for q, a, t in zip(questions[:8], model_answers, truths, strict=False)],
        "caption_examples": [{"caption": c, "truth": t} for c, t in zip(model_captions[:4], captions, strict=False)],
    }


def save_qa_grid(path: Path, images: list[Image.Image], questions: list[str], answers: list[str], truths: list[str],
                 cell: int = 96) -> None:
    """One row per question: image (nearest-neighbour upscaled) | question | model answer | truth."""
    header, widths = 20, (cell, 260, 110, 110)
    canvas = Image.new("RGB", (sum(widths), header + cell * len(images)), "white")
    draw = ImageDraw.Draw(canvas)
    for x, title in zip((0, widths[0], widths[0] + widths[1], widths[0] + widths[1] + widths[2]),
                        ("image", "question", "model", "truth"), strict=False):
        draw.text((x + 4, 4), title, fill="black")
    for row, (image, question, answer, truth) in enumerate(zip(images, questions, answers, truths, strict=False)):
        y = header + row * cell
        canvas.paste(image.resize((cell, cell), Image.NEAREST), (0, y))
        x = widths[0]
        draw.text((x + 4, y + cell // 2 - 6), question, fill="black")
        color = "green" if normalize(answer) == normalize(truth) else "red"
        draw.text((x + widths[1] + 4, y + cell // 2 - 6), answer or "(nothing)", fill=color)
        draw.text((x + widths[1] + widths[2] + 4, y + cell // 2 - 6), truth, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
