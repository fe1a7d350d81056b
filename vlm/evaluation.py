"""The demo's VLM evaluation, and the PNG grid of answers that scripts/vlm_eval.py also writes.

`score_scenes` is the demo's evaluation on held-out procedural scenes: QA exact match for the model, for the
same model shown a blank image, and for the best blind answer (the majority answer per question type);
caption token F1 for the model and the blank image; a PNG grid of image | question | answer | truth.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from vlm.chat import Chat
from vlm.metrics import exact_match, token_f1, vqa_normalize


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
    """One row per question: image (nearest-neighbour upscaled) | question | model answer | truth, each text
    wrapped to its column (captions are long); the answer green when it matches the truth (VQA-normalised)."""
    header, widths = 20, (cell, 220, 200, 200)
    canvas = Image.new("RGB", (sum(widths), header + cell * len(images)), "white")
    draw = ImageDraw.Draw(canvas)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    for x, title in zip(starts, ("image", "question", "model", "truth"), strict=True):
        draw.text((x + 4, 4), title, fill="black")
    for row, (image, question, answer, truth) in enumerate(zip(images, questions, answers, truths, strict=False)):
        y = header + row * cell
        canvas.paste(image.resize((cell, cell), Image.NEAREST), (0, y))
        color = "green" if vqa_normalize(answer) == vqa_normalize(truth) else "red"
        for x, width, text, fill in zip(starts[1:], widths[1:], (question, answer or "(nothing)", truth),
                                        ("black", color, "black"), strict=True):  # fmt: skip
            lines = textwrap.wrap(text, width // 6 - 1)[: cell // 12]  # the default font: ~6 x 11 px per character
            draw.multiline_text((x + 4, y + max(4, cell // 2 - 6 * len(lines))), "\n".join(lines), fill=fill, spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
