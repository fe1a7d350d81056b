"""Talking to a VLM: a model with its text tokenizer and image processor, conversations in, answers out.

    chat = Chat.load("runs/vlm/sft/export", "runs/vlm/tokenizer")
    answers = chat.answer(images, questions)            # batched greedy one-turn answers
    captions = chat.caption(images)
    for text in chat.stream(turns, images, max_new_tokens=64, temperature=0.0):
        ...                                             # the answer so far, after each new token

One implementation for the evaluation (vlm.evaluation, scripts/vlm_eval.py), the web app's chat tab
(scripts/app_chat.py) and the terminal chat (scripts/chat.py). Turns are vlm.text's: `<image>` markers in
user content, one per image, in order; each marker is expanded to its image's token count here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from vlm.processing import ImageProcessor
from vlm.splice import expand_placeholders


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
    def __init__(self, vlm, tokenizer, processor: ImageProcessor | None = None, batch_size: int = 32,
                 sources: dict[str, str] | None = None):  # fmt: skip
        from vlm.text import END_OF_TURN, IMAGE_TOKEN, check_tokenizer_for

        self.vlm, self.tokenizer = vlm.eval(), tokenizer
        self.processor = processor or ImageProcessor.for_model(vlm)
        self.image_id, self.image_token = check_tokenizer_for(vlm, tokenizer), IMAGE_TOKEN
        self.batch_size, self.sources = batch_size, sources or {}
        # An answer ends at the template's end-of-turn token (or EOS).
        self.stop_ids = [i for i in (tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id) if i is not None]
        self.max_length = vlm.llm.model.config.max_position_embeddings

    @classmethod
    def load(cls, vlm_dir: str, tokenizer_dir: str | None = None, device: str = "cpu", **options) -> Chat:
        """The VLM in `vlm_dir`; its text tokenizer from `tokenizer_dir` (default: the same directory)."""
        from vlm import VLM
        from vlm.text import load_text_tokenizer

        tokenizer_dir = tokenizer_dir or vlm_dir
        vlm = VLM.from_pretrained(vlm_dir).to(device)
        return cls(vlm, load_text_tokenizer(tokenizer_dir), sources={"vlm": vlm_dir, "text": tokenizer_dir}, **options)

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    def prompt_ids(self, turns: list[dict], images: list[Image.Image], generation_prompt: bool = True):
        """-> (ids with each `<image>` expanded to its image's tokens, pixel tiles [n_tiles, 3, S, S] or None)."""
        from vlm.text import encode_turns

        ids, _ = encode_turns(self.tokenizer, turns, add_generation_prompt=generation_prompt, eos=False)
        if not images:
            return ids, None
        processed = self.processor(images)
        return expand_placeholders(ids, self.image_id, processed.tokens_per_image), processed.pixel_values

    @torch.no_grad()
    def generate(self, prompts: list[tuple[list[int], torch.Tensor | None]], max_new_tokens: int, **options) -> list[str]:
        """Continuations of (ids, pixels) prompts (greedy unless `temperature` is given), batched with left
        padding, each stopping at the end of its turn -> decoded texts."""
        options = {"temperature": 0.0, "eos_token_id": self.stop_ids} | options
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            input_ids, mask, pixels = self.left_padded(prompts[start : start + self.batch_size])
            new = self.vlm.generate(input_ids=input_ids, pixel_values=pixels, attention_mask=mask,
                                    max_new_tokens=max_new_tokens, **options)  # fmt: skip
            texts += [self.tokenizer.decode(self._answer_ids(row.tolist()), skip_special_tokens=True).strip() for row in new]
        return texts

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def left_padded(self, prompts: list[tuple[list[int], torch.Tensor | None]]):
        """(ids, pixels) prompts -> (input_ids long [B, L] left-padded, attention_mask [B, L], pixel tiles or None)
        on the model's device: one batch for generation, each prompt ending at the last position."""
        width = max(len(ids) for ids, _ in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids, _ in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in prompts], device=self.device)
        pixels = [p for _, p in prompts if p is not None]
        return input_ids, mask, torch.cat(pixels).to(self.device) if pixels else None

    def _answer_ids(self, ids: list[int]) -> list[int]:
        """The ids before the first stop id."""
        stops = [ids.index(s) for s in self.stop_ids if s in ids]
        return ids[: min(stops)] if stops else ids

    def answer(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 6, **options) -> list[str]:
        """One single-turn answer per (image, question)."""
        prompts = [self.prompt_ids([{"role": "user", "content": f"{self.image_token}\n{q}"}], [image])
                   for image, q in zip(images, questions, strict=True)]  # fmt: skip
        return self.generate(prompts, max_new_tokens, **options)

    def caption(self, images: list[Image.Image], max_new_tokens: int = 24, **options) -> list[str]:
        """The text that follows each image as a document segment (how captions are trained)."""
        return self.generate([self.caption_prompt(image) for image in images], max_new_tokens, **options)

    def caption_prompt(self, image: Image.Image):
        """(ids, pixel tiles) of `image` as a document segment that its caption follows: `<image>` newline."""
        return self.prompt_ids([{"role": "text", "content": f"{self.image_token}\n"}], [image], generation_prompt=False)

    def stream(self, turns: list[dict], images: list, max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:  # fmt: skip
        """The next answer of a conversation so far, after each new token."""
        ids, pixel_values = self.prompt_ids(turns, images)
        if len(ids) + max_new_tokens > self.max_length:
            raise ValueError(
                f"the conversation takes {len(ids)} tokens and the answer up to {max_new_tokens} more, "
                f"beyond the model's {self.max_length} positions: clear the chat or ask for a shorter answer"
            )
        input_ids = torch.tensor([ids], device=self.device)
        pixel_values = None if pixel_values is None else pixel_values.to(self.device)

        def run(callback):
            return self.vlm.generate(
                input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, seed=seed, eos_token_id=self.stop_ids, callback=callback,
            )  # fmt: skip

        for new in stream_ids(run):
            yield self.tokenizer.decode(self._answer_ids(new), skip_special_tokens=True)

    def info_rows(self) -> list[tuple[str, str]]:
        """(what, description) rows about the model, for the web app's info tab."""
        c = self.vlm.config
        params = sum(p.numel() for p in self.vlm.parameters())
        return [
            ("VLM", f"`{self.sources.get('vlm', '(in memory)')}` ({c.family}), {params:,} parameters"),
            ("VLM parts", f"encoder {c.encoder.get('kind')}, connector {c.connector}, LLM {c.llm.get('kind')} "
                          f"(vocab {self.vlm.llm.vocab_size}, {self.max_length} positions)"),
            ("VLM text tokenizer", f"`{self.sources.get('text', '(in memory)')}`, {len(self.tokenizer)} ids"),
            ("VLM images", f"{self.processor.tile_size} px tiles, {self.processor.tokens_per_tile} tokens each"),
        ]  # fmt: skip
