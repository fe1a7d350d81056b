"""In-context prompting of an LVM: images -> visual-sentence prompt -> generated tokens -> images.

A prompt is laid out exactly as training sentences are (data/packing.py): `[BOS] img1 img2 ...`,
each image `tokens_per_image` codes row-major, and the model is asked for `tokens_per_image` new
codes per image it should produce. BOS can be left out for checkpoints trained without it (the
released LVM-7B never saw one).

    analogy               [x1, y1, ..., xn, yn, x_query] -> y_query
    sequence continuation [f1, ..., ft] -> f_{t+1}, ..., f_{t+k}, one frame at a time, each conditioned
                          on a sliding window of the last `context_frames` frames (15, as LVM does)

    prompter = InContextPrompter(LVM.from_pretrained(dir), VQGAN.from_pretrained(tok_dir))
    result = prompter.analogy(["x1.png", "y1.png", "x2.png"], num_candidates=4, temperature=1.0)
    result.save_grid("out.png")   # prompt | generations | ground truth (when given), a row per candidate
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from lvm.checkpoints import atomic_path
from lvm.model import LVM
from tokenizer import VQGAN, fit_to_resolution, to_pil, to_tensor
from tokenizer.images import ImageLike, resolve_image

CONTEXT_FRAMES = 15  # LVM's sequence prompting: 15 frames of context + 1 generated = 16 images = 4096 tokens
MODES = ("analogy", "sequence")


def _check_image_file(path: str | os.PathLike, what: str) -> None:
    """Read only the header; a missing or non-image file raises ValueError naming it."""
    try:
        Image.open(path).close()
    except (OSError, SyntaxError) as error:  # PIL raises SyntaxError for some corrupt headers
        raise ValueError(f"{what} {os.fspath(path)!r} is not a readable image: {error}") from error


def check_analogy_count(count: int) -> None:
    """An analogy prompt is example pairs plus one query: an odd number of images, at least 3."""
    if count < 3 or count % 2 == 0:
        raise ValueError(
            f"an analogy prompt needs example pairs plus a query, an odd number of images >= 3 "
            f"(x1 y1 x2 y2 ... xq); got {count}"
        )


def image_grid(rows: Sequence[Sequence[Sequence[Image.Image]]], gap: int = 2, section_gap: int = 10) -> Image.Image:
    """Rows of sections of images -> one image; sections (prompt | generation | truth) are set apart by
    a wider gap so they read as groups. Empty sections take no space; images are shown at their size."""
    side = max(im.height for row in rows for section in row for im in section)
    widths = [
        sum(len(s) * side + (len(s) - 1) * gap for s in row if s) + section_gap * (sum(1 for s in row if s) - 1)
        for row in rows
    ]
    canvas = Image.new("RGB", (max(widths), len(rows) * side + (len(rows) - 1) * gap), "white")
    for r, row in enumerate(rows):
        x = 0
        for section in (s for s in row if s):
            for im in section:
                canvas.paste(im, (x, r * (side + gap)))
                x += side + gap
            x += section_gap - gap
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write atomically (a crashed batch job never leaves a half-written grid that looks done)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


@dataclass
class PromptResult:
    """What one prompt produced. `tokens` long [candidates, frames, tokens_per_image]."""

    prompt: list[Image.Image]  # the prompt images at the tokenizer resolution (what the model saw)
    generated: list[list[Image.Image]]  # [candidate][frame], decoded
    tokens: torch.Tensor
    truth: list[Image.Image] | None = None  # the known answer / next frames, at the tokenizer resolution

    def grid(self) -> Image.Image:
        """One row per candidate: prompt | generated frames | ground truth (when known)."""
        return image_grid([[self.prompt, frames, self.truth or []] for frames in self.generated])

    def save_grid(self, path: str | os.PathLike) -> Path:
        return save_png(self.grid(), path)


class InContextPrompter:
    """Prompts `model` with images tokenized by `tokenizer`; see the module docstring for the layouts.

    `use_bos=False` for checkpoints trained without BOS. `context_frames` bounds the sliding window of
    sequence continuation (fewer frames are used when that many would not fit the model's positions).
    """

    def __init__(self, model: LVM, tokenizer: VQGAN, use_bos: bool = True, context_frames: int = CONTEXT_FRAMES):
        if model.config.codebook_size != tokenizer.config.codebook_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.config.codebook_size} codes but the model was trained on "
                f"{model.config.codebook_size}: its token ids would mean different images. Use the tokenizer "
                "the model's training shards were made with."
            )
        if context_frames < 1:
            raise ValueError(f"context_frames must be >= 1; got {context_frames}")
        self.model = model.eval()
        self.tokenizer = tokenizer.eval()
        self.use_bos = use_bos
        self.context_frames = context_frames

    @property
    def tokens_per_image(self) -> int:
        return self.tokenizer.config.tokens_per_image

    @property
    def resolution(self) -> int:
        return self.tokenizer.config.resolution

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- images <-> tokens ------------------------------------------------------------------------------
    def fit_images(self, images: Sequence[ImageLike], what: str = "prompt image") -> list[Image.Image]:
        """Load and fit images to the tokenizer resolution (square center crop), as training data is."""
        return [fit_to_resolution(resolve_image(im, what), self.resolution) for im in images]

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any size) -> long [n, tokens_per_image] on the model's device."""
        return self.tokenizer.encode(to_tensor(list(images), self.resolution)).to(self.device)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """long [..., tokens_per_image] -> float [..., 3, H, W] in [0, 1]."""
        images = self.tokenizer.decode(tokens.reshape(-1, self.tokens_per_image))
        return images.reshape(*tokens.shape[:-1], *images.shape[1:])

    def prompt_ids(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """long [n_images, tokens_per_image] -> the 1-D prompt `[BOS] img1 .. imgn` (BOS if use_bos)."""
        ids = image_tokens.reshape(-1)
        if self.use_bos:
            ids = torch.cat([ids.new_tensor([self.model.config.bos_id]), ids])
        return ids

    # -- generation ---------------------------------------------------------------------------------------
    def window_frames(self) -> int:
        """How many context frames fit beside one generated frame: context_frames, or fewer for short models."""
        room = self.model.config.max_position_embeddings - int(self.use_bos) - self.tokens_per_image
        fits = room // self.tokens_per_image
        if fits < 1:
            raise ValueError(
                f"max_position_embeddings {self.model.config.max_position_embeddings} cannot hold one context "
                f"image and one generated image of {self.tokens_per_image} tokens"
            )
        return min(self.context_frames, fits)

    def check_fits(self, n_images: int) -> None:
        """An analogy is not windowed (dropping examples changes the task): it must fit whole."""
        length = int(self.use_bos) + (n_images + 1) * self.tokens_per_image
        if length > self.model.config.max_position_embeddings:
            raise ValueError(
                f"{n_images} prompt images + the answer take {length} tokens, more than the model's "
                f"max_position_embeddings {self.model.config.max_position_embeddings}; use fewer example pairs"
            )

    @torch.no_grad()
    def complete(
        self,
        contexts: Sequence[torch.Tensor],
        n_frames: int = 1,
        num_candidates: int = 1,
        window: int | None = None,
        seed: int | None = None,
        **sampling,
    ) -> torch.Tensor:
        """Generate `n_frames` images after each context, `num_candidates` times, batched.

        contexts: long [n_i, tokens_per_image] each (the prompt images' tokens; lengths may differ).
        window: condition each new frame on the last `window` frames only (None: all of them).
        sampling: temperature / top_k / top_p as LVM.generate takes them.
        Returns long [len(contexts), num_candidates, n_frames, tokens_per_image].
        """
        if n_frames < 1 or num_candidates < 1:
            raise ValueError(f"n_frames and num_candidates must be >= 1; got {n_frames} and {num_candidates}")
        # One row per (context, candidate); each row grows by its own generated frames.
        rows = [context for context in contexts for _ in range(num_candidates)]
        for step in range(n_frames):
            prompts = [self.prompt_ids(row if window is None else row[-window:]) for row in rows]
            batch = torch.stack(prompts) if len({len(p) for p in prompts}) == 1 else prompts
            step_seed = None if seed is None else seed + step  # distinct draws for each frame
            new = self.model.generate(batch, max_new_tokens=self.tokens_per_image, seed=step_seed, **sampling)
            rows = [torch.cat([row, frame[None]]) for row, frame in zip(rows, new, strict=True)]
        generated = torch.stack([row[-n_frames:] for row in rows])
        return generated.reshape(len(contexts), num_candidates, n_frames, self.tokens_per_image)

    def _result(self, prompt: list[Image.Image], tokens: torch.Tensor, truth: list[Image.Image] | None) -> PromptResult:
        """tokens long [candidates, frames, tokens_per_image] -> decoded PromptResult."""
        images = self.decode(tokens)
        return PromptResult(prompt, [to_pil(frames) for frames in images], tokens.cpu(), truth)

    def analogy(
        self,
        images: Sequence[ImageLike],
        num_candidates: int = 1,
        truth: ImageLike | None = None,
        **sampling,
    ) -> PromptResult:
        """`[x1, y1, ..., xn, yn, xq]` -> candidates for yq. `truth`: the known yq, shown in the grid."""
        check_analogy_count(len(images))
        self.check_fits(len(images))
        prompt = self.fit_images(images)
        known = None if truth is None else self.fit_images([truth], "ground-truth image")
        tokens = self.complete([self.encode(prompt)], 1, num_candidates, **sampling)[0]
        return self._result(prompt, tokens, known)

    def continue_sequence(
        self,
        frames: Sequence[ImageLike],
        n_frames: int = 1,
        num_candidates: int = 1,
        truth: Sequence[ImageLike] | None = None,
        **sampling,
    ) -> PromptResult:
        """Frames -> the next `n_frames` frames, sliding a window of the last context frames."""
        if not frames:
            raise ValueError("sequence continuation needs at least one frame")
        window = self.window_frames()  # checked before any image is loaded or generated
        prompt = self.fit_images(frames, "frame")
        known = None if truth is None else self.fit_images(truth, "ground-truth frame")
        tokens = self.complete([self.encode(prompt)], n_frames, num_candidates, window, **sampling)[0]
        return self._result(prompt, tokens, known)


# -- jobs: what scripts/prompt.py runs, one prompt or a jsonl batch ---------------------------------------
@dataclass
class PromptJob:
    """One prompt: its images, where its grid goes, and (optionally) the known answer frames."""

    images: list[str]
    output: str
    mode: str = "analogy"
    truth: list[str] = field(default_factory=list)
    frames: int = 1  # images to generate (sequence mode; an analogy has one answer)

    def check(self) -> None:
        """Everything that can be wrong with the job's input, found without loading a model or an image."""
        if self.mode not in MODES:
            raise ValueError(f"unknown prompting mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.mode == "analogy":
            check_analogy_count(len(self.images))
            if len(self.truth) > 1:
                raise ValueError(f"an analogy has one answer; got {len(self.truth)} ground-truth images")
        elif not self.images:
            raise ValueError("sequence continuation needs at least one frame")
        for path in self.images:
            _check_image_file(path, "prompt image")
        for path in self.truth:
            _check_image_file(path, "ground-truth image")

    def run(self, prompter: InContextPrompter, num_candidates: int = 1, **sampling) -> PromptResult:
        if self.mode == "analogy":
            truth = self.truth[0] if self.truth else None
            return prompter.analogy(self.images, num_candidates, truth, **sampling)
        return prompter.continue_sequence(self.images, self.frames, num_candidates, self.truth or None, **sampling)


def read_jobs(path: str | os.PathLike, mode: str = "analogy", frames: int = 1) -> list[PromptJob]:
    """A jsonl of {"images": [...], "output": "grid.png", "truth": [...], "mode": .., "frames": ..} lines
    (LVM's batch_generation input, plus optional truth); `mode` and `frames` are the defaults for lines
    without them. Relative paths are relative to the jsonl file. Every job is checked before returning."""
    base = Path(path).parent
    jobs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            job = PromptJob(
                images=[str(base / p) for p in entry["images"]],
                output=str(base / entry["output"]),
                mode=entry.get("mode", mode),
                truth=[str(base / p) for p in entry.get("truth", [])],
                frames=int(entry.get("frames", frames)),
            )
            job.check()
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: {error!r}") from error
        jobs.append(job)
    return jobs


# -- command-line options shared by scripts/prompt.py and scripts/eval.py ---------------------------------
def add_prompter_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("--model", required=True, help="LVM directory (HF Llama layout, e.g. save_pretrained)")
    parser.add_argument("--tokenizer", required=True, help="VQGAN checkpoint (own dir, taming .ckpt, open-muse dir)")
    parser.add_argument("--no-bos", action="store_true", help="prompt without BOS (the released LVM-7B)")
    parser.add_argument("--context-frames", type=int, default=CONTEXT_FRAMES, help="sequence sliding window")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="LVM weights")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def prompter_from_args(args: argparse.Namespace) -> InContextPrompter:
    tokenizer = VQGAN.from_pretrained(args.tokenizer).to(args.device)
    model = LVM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    return InContextPrompter(model, tokenizer, use_bos=not args.no_bos, context_frames=args.context_frames)


def sampling_from_args(args: argparse.Namespace) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
