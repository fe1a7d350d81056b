"""The web app's VLM chat tab (scripts/app.py --vlm DIR): images and a question in, the answer streamed
token by token, the conversation kept as history and sent back with each new question.

The model runs in a worker thread; LVM-style generate callbacks put each new token on a queue that the
Gradio handler drains, re-decoding the answer so far (a token can be part of a word).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import gradio as gr
import torch


def stream_ids(generate: Callable[[Callable], torch.Tensor]) -> Iterator[list[int]]:
    """Run `generate(callback)` in a thread; yield the ids of row 0 generated so far after each new token.
    An exception in the model call is raised here, in the caller's thread."""
    updates: queue.Queue = queue.Queue()
    failure: list[BaseException] = []

    def work():
        try:
            generate(lambda step, tokens: updates.put(int(tokens[0])))
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)
        finally:
            updates.put(None)

    threading.Thread(target=work, daemon=True).start()
    ids: list[int] = []
    while (token := updates.get()) is not None:
        ids.append(token)
        yield ids
    if failure:
        raise failure[0]


class Chat:
    """A VLM with its text tokenizer and image processor: a conversation (turns + images) -> answer text."""

    def __init__(self, vlm, tokenizer, processor, sources: dict[str, str]):
        from vlm.text import END_OF_TURN, check_tokenizer

        self.vlm, self.tokenizer, self.processor, self.sources = vlm.eval(), tokenizer, processor, sources
        self.image_id = check_tokenizer(tokenizer)
        if vlm.config.image_token_id != self.image_id:
            raise ValueError(
                f"the tokenizer's <image> id is {self.image_id} but the VLM was trained with image_token_id "
                f"{vlm.config.image_token_id}: use the tokenizer the VLM was trained with"
            )
        if len(tokenizer) > vlm.llm.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} ids, more than the VLM's vocabulary {vlm.llm.vocab_size}"
            )
        # A chat answer ends at the template's end-of-turn token (or EOS).
        self.stop_ids = [
            i for i in (tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id) if i is not None
        ]
        self.max_length = vlm.llm.model.config.max_position_embeddings

    @classmethod
    def load(cls, vlm_dir: str, tokenizer_dir: str | None, device: str) -> Chat:
        """The VLM in `vlm_dir`; its text tokenizer from `tokenizer_dir` (default: the same directory)."""
        from vlm import VLM
        from vlm.processing import ImageProcessor
        from vlm.text import load_text_tokenizer

        tokenizer_dir = tokenizer_dir or vlm_dir
        vlm = VLM.from_pretrained(vlm_dir).to(device)
        return cls(
            vlm,
            load_text_tokenizer(tokenizer_dir),
            ImageProcessor.for_model(vlm),
            {"vlm": vlm_dir, "text": tokenizer_dir},
        )

    def prompt(self, turns: list[dict], images: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Turns (`<image>` markers in user content, one per image, in order) -> (input_ids [1, L],
        pixel_values [n_tiles, 3, S, S] or None), each marker expanded to its image's token count."""
        from vlm.splice import expand_placeholders
        from vlm.text import encode_turns

        ids, _ = encode_turns(self.tokenizer, turns, add_generation_prompt=True)
        pixel_values = None
        if images:
            processed = self.processor(images)
            ids = expand_placeholders(ids, self.image_id, processed.tokens_per_image)
            pixel_values = processed.pixel_values
        device = next(self.vlm.parameters()).device
        return torch.tensor([ids], device=device), None if pixel_values is None else pixel_values.to(device)

    def answer(
        self, turns: list[dict], images: list, max_new_tokens: int, temperature: float
    ) -> Iterator[str]:
        """The answer so far, after each new token."""
        input_ids, pixel_values = self.prompt(turns, images)
        if input_ids.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(
                f"the conversation takes {input_ids.shape[1]} tokens and the answer up to {max_new_tokens} more, "
                f"beyond the model's {self.max_length} positions: clear the chat or ask for a shorter answer"
            )

        def run(callback):
            return self.vlm.generate(
                input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=max_new_tokens,
                temperature=temperature, eos_token_id=self.stop_ids, callback=callback,
            )  # fmt: skip

        for ids in stream_ids(run):
            yield self.tokenizer.decode([i for i in ids if i not in self.stop_ids], skip_special_tokens=True)

    def info_rows(self) -> list[tuple[str, str]]:
        c = self.vlm.config
        params = sum(p.numel() for p in self.vlm.parameters())
        return [
            ("VLM", f"`{self.sources['vlm']}` ({c.family}), {params:,} parameters"),
            ("VLM parts", f"encoder {c.encoder.get('kind')}, connector {c.connector}, LLM {c.llm.get('kind')} "
                          f"(vocab {self.vlm.llm.vocab_size}, {self.max_length} positions)"),
            ("VLM text tokenizer", f"`{self.sources['text']}`, {len(self.tokenizer)} ids"),
            ("VLM images", f"{self.processor.tile_size} px tiles, {self.processor.tokens_per_tile} tokens each"),
        ]  # fmt: skip

    # -- the page -------------------------------------------------------------------------------------
    def respond(self, message: dict, messages: list, turns: list, images: list, max_new_tokens, temperature):
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
            for answer in self.answer(asked, shown_images, int(max_new_tokens), float(temperature)):
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
        chat.respond, [box, messages, turns, images, max_new_tokens, temperature], [box, messages, turns, images],
        concurrency_id=concurrency_id,
    )  # fmt: skip
    clear.click(lambda: ([], [], []), None, [messages, turns, images], concurrency_limit=None)
