"""The web app's VLM chat tab (scripts/app.py --vlm DIR): images and a question in, the answer streamed
token by token, the conversation kept as history and sent back with each new question.

The model side (prompting, streaming in a worker thread, stopping at the end of turn) is vlm.chat.Chat, which
the terminal chat (scripts/chat.py) shares; this module is the page around it.
"""

from __future__ import annotations

import functools

import gradio as gr

from vlm.chat import Chat


def respond(chat: Chat, message: dict, messages: list, turns: list, images: list, max_new_tokens, temperature):
    """Gradio handler: streams (textbox, chat messages, turns, images) as the answer grows."""
    from tokenizer.images import resolve_image

    text, files = (message or {}).get("text", "").strip(), (message or {}).get("files", [])
    if not text and not files:
        raise gr.Error(
            "type a question (and attach images if you like)", duration=10, print_exception=False
        )
    try:
        new_images = [resolve_image(path, "attached file") for path in files]
    except ValueError:
        raise gr.Error(
            "an attached file is not an image (PNG, JPEG, ...)", duration=30, print_exception=False
        ) from None
    # The state keeps the conversation as it was until the answer is complete.
    asked = [*turns, {"role": "user", "content": "<image>\n" * len(new_images) + text}]
    shown_images = [*images, *new_images]
    shown = [
        {"role": "user", "content": [*({"path": p} for p in files), text]},
        {"role": "assistant", "content": ""},
    ]
    messages = [*messages, *shown]
    answer = ""
    yield None, messages, turns, images  # the question shows before the first token
    try:
        for answer in chat.stream(asked, shown_images, int(max_new_tokens), float(temperature)):
            messages[-1] = {"role": "assistant", "content": answer}
            yield None, messages, turns, images
    except ValueError as error:
        raise gr.Error(str(error), duration=30, print_exception=False) from None
    yield None, messages, [*asked, {"role": "assistant", "content": answer}], shown_images


def chat_tab(chat: Chat, concurrency_id: str) -> None:
    """The VLM chat tab: a conversation, a box for the question and its images, sampling, clear."""
    turns, images = gr.State([]), gr.State([])
    messages = gr.Chatbot(label="conversation", render_markdown=False, height=420, elem_id="chat-messages")
    box = gr.MultimodalTextbox(
        label="question", placeholder="Ask about an image: attach it, type a question, press Enter", file_count="multiple",
        file_types=["image"], elem_id="chat-box",
    )  # fmt: skip
    with gr.Row():
        max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="max new tokens", elem_id="chat-max-new")
        temperature = gr.Slider(
            0, 2, value=0.0, step=0.05, label="temperature (0 = greedy)", elem_id="chat-temperature"
        )
        clear = gr.Button("Clear", elem_id="chat-clear")
    box.submit(
        functools.partial(respond, chat), [box, messages, turns, images, max_new_tokens, temperature], [box, messages, turns, images],
        concurrency_id=concurrency_id,
    )  # fmt: skip
    clear.click(lambda: ([], [], []), None, [messages, turns, images], concurrency_limit=None)
