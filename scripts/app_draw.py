"""The web app's Draw tab (scripts/app.py --vlm DIR, for a VLM with a generation side, e.g. configs/unified):
a caption in, images out; example images with their captions before it make it in-context generation (EMU2).
The model side is vlm.draw.draw, which scripts/prompt.py --draw and scripts/chat.py /draw share."""

from __future__ import annotations

import functools

import gradio as gr

from vlm.chat import Chat


def draw_images(chat: Chat, caption: str, files: list[str] | None, example_captions: str, count, guidance, temperature,
                seed) -> list:  # fmt: skip
    """Gradio handler: `count` images of `caption` (seeds seed, seed + 1, ..) after the (file, caption) examples,
    one caption per line in the order of the files."""
    from tokenizer.images import resolve_image
    from vlm.draw import draw_candidates

    captions = [line.strip() for line in (example_captions or "").splitlines() if line.strip()]
    files = files or []
    if not caption.strip():
        raise gr.Error("type a caption to draw", duration=10, print_exception=False)
    if len(captions) != len(files):
        raise gr.Error(f"{len(files)} example images but {len(captions)} example captions: give one caption per line "
                       "for each image, in order", duration=30, print_exception=False)  # fmt: skip
    try:
        examples = [(text, resolve_image(path, "example file")) for text, path in zip(captions, files, strict=True)]
        options = {"guidance_scale": float(guidance), "temperature": float(temperature)}
        return [images[0] for images in draw_candidates(chat, [caption.strip()], int(count), examples, int(seed), **options)]
    except ValueError as error:
        raise gr.Error(str(error), duration=30, print_exception=False) from None


def draw_tab(chat: Chat, concurrency_id: str) -> None:
    caption = gr.Textbox(label="caption", placeholder="a small red circle on the left on a plain white background",
                         elem_id="draw-caption")  # fmt: skip
    with gr.Accordion("in-context examples (optional)", open=False):
        files = gr.File(file_count="multiple", label="example images", elem_id="draw-files")
        example_captions = gr.Textbox(label="their captions, one per line", lines=3, elem_id="draw-example-captions")
    with gr.Row():
        count = gr.Slider(1, 8, value=4, step=1, label="images", elem_id="draw-count")
        guidance = gr.Slider(1, 10, value=5.0, step=0.5, label="guidance scale", elem_id="draw-guidance")
        temperature = gr.Slider(0, 2, value=1.0, step=0.05, label="temperature (0 = greedy)", elem_id="draw-temperature")
        seed = gr.Number(value=0, precision=0, label="seed", elem_id="draw-seed")
    go = gr.Button("Draw", variant="primary", elem_id="draw-run")
    drawn = gr.Gallery(label="drawn", columns=4, elem_id="draw-out")
    go.click(functools.partial(draw_images, chat), [caption, files, example_captions, count, guidance, temperature, seed],
             drawn, concurrency_id=concurrency_id)  # fmt: skip
