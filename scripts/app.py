"""A web app for in-context prompting of an LVM (Gradio); the prompting itself is lvm.prompting's.

    python -m scripts.app --lvm runs/demo/lvm/export --tokenizer runs/demo/tokenizer/export   # or `make app`
    python -m scripts.app --lvm .. --tokenizer .. --vlm DIR [--vlm-tokenizer DIR]              # + VLM chat

Tabs: in-context (example pairs + a query -> answer candidates; held-out procedural analogies as
presets), video (frames -> the next frames), VLM chat (with --vlm; scripts/app_chat.py), Draw (with a --vlm that
writes images: caption and optional examples -> images; scripts/app_draw.py), model info. Requests go through Gradio's queue one
model call at a time (CPU: a second call would only halve the speed of both). Uploads are checked
as they arrive, outside that queue, so a bad file is answered at once on the page even while
another visitor's generation runs; no error shows a stack trace and the server keeps serving.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from data.procedural import TASKS, moving_shapes, procedural_analogy, procedural_seeds
from lvm import LVM
from lvm.prompting import (
    CONTEXT_FRAMES,
    InContextPrompter,
    PromptResult,
    check_analogy_count,
    save_png,
)
from scripts.app_chat import chat_tab
from scripts.app_draw import draw_tab
from tokenizer import VQGAN
from tokenizer.images import resolve_image
from vlm.chat import Chat

DEMO_LVM, DEMO_TOKENIZER = "runs/demo/lvm/export", "runs/demo/tokenizer/export"  # where `make demo` exports
MODEL_CALLS = "model"  # the one concurrency group every generation shares
CSS = "img {image-rendering: pixelated}"  # tiny images, sharp
DISPLAY_SIDE = 96  # the grid on the page shows each image at least this many pixels wide


def on_page(fn: Callable) -> Callable:
    """A bad input (ValueError, from our checks or the prompter's) becomes a message on the page."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as error:
            raise gr.Error(str(error), duration=30, print_exception=False) from None

    return wrapper


def preview(files: list[str] | None, check: Callable, shown: Callable) -> tuple[list, str]:
    """Uploads -> (gallery, status line). A problem goes in the status line, beside the files, where it
    stays until the files change (a message box would cover the page and fade)."""
    if not files:
        return [], ""
    try:
        return shown(check(files))
    except ValueError as error:
        return [], f"**Cannot use these files:** {error}"


def natural_key(path: str) -> list:
    """Sort uploads by file name with numbers compared as numbers (x2.png before x10.png)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", Path(path).name.lower())]


def read_uploads(files: list[str] | None, what: str) -> list[Image.Image]:
    """Uploaded files, in file-name order -> PIL images; a file that is not an image is named."""
    if not files:
        raise ValueError(f"no {what}s: upload image files or load an example")
    images = []
    for path in sorted(files, key=natural_key):
        try:
            images.append(resolve_image(path, what))
        except ValueError:
            raise ValueError(
                f"{Path(path).name!r} is not an image file (PNG, JPEG, ...): remove it"
            ) from None
    return images


def progress_callback(progress, total: int) -> Callable[[int, torch.Tensor], None]:
    """LVM.generate's per-token callback -> Gradio's progress bar over all `total` new tokens."""
    done = iter(range(1, total + 1))
    return lambda step, tokens: progress((next(done, total), total), desc="generating", unit="tokens")


class App:
    """The handlers behind the page: uploads in, images out. `workdir` holds presets and grids."""

    def __init__(
        self, prompter: InContextPrompter, workdir: Path, sources: dict[str, str], chat: Chat | None = None
    ):
        self.prompter = prompter
        self.chat = chat  # the VLM chat tab's model, when --vlm is given
        self.workdir = workdir
        self.sources = sources  # what was loaded from where, for the info tab

    def _new_dir(self, kind: str) -> Path:
        """A fresh folder per request (handlers outside the model queue run in parallel threads)."""
        return Path(tempfile.mkdtemp(prefix=kind, dir=self.workdir))

    def _save(self, images: list[Image.Image], kind: str, names: list[str]) -> list[str]:
        directory = self._new_dir(kind)
        return [
            str(save_png(image, directory / f"{name}.png")) for image, name in zip(images, names, strict=True)
        ]

    def _sampling(self, temperature, top_k, seed, total: int, progress) -> dict:
        return {
            "temperature": float(temperature),
            "top_k": int(top_k) if top_k else None,  # 0 / empty: no top-k cut
            "seed": None if seed is None or seed < 0 else int(seed),
            "callback": progress_callback(progress, total),
        }

    def _outputs(self, result: PromptResult, kind: str) -> tuple:
        """(gallery of candidates, grid image shown enlarged, grid PNG file for download at model size)."""
        grid = result.grid()
        path = save_png(grid, self._new_dir(kind) / f"{kind}_grid.png")
        scale = max(1, DISPLAY_SIDE // self.prompter.resolution)  # nearest: each code's pixels stay visible
        captions = [
            (frame, f"candidate {c + 1}" + (f", frame {f + 1}" if len(frames) > 1 else ""))
            for c, frames in enumerate(result.generated)
            for f, frame in enumerate(frames)
        ]
        return captions, grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST), str(path)

    # -- in-context ---------------------------------------------------------------------------------------
    def check_analogy(self, files: list[str] | None) -> list[Image.Image]:
        images = read_uploads(files, "prompt image")
        check_analogy_count(len(images))
        self.prompter.check_fits(len(images))
        return images

    def preview_analogy(self, files):
        def shown(images):
            roles = [f"{'x' if i % 2 == 0 else 'y'}{i // 2 + 1}" for i in range(len(images) - 1)] + ["query"]
            return list(zip(images, roles, strict=True)), f"{len(images) // 2} example pair(s) and a query"

        return preview(files, self.check_analogy, shown)

    @on_page
    def analogy_preset(self, task: str, index: float, pairs: float):
        """A held-out procedural analogy (seeds never trained on) -> its prompt files and known answer."""
        seed = procedural_seeds("heldout", 1, start=int(index))[0]
        sentence = procedural_analogy(
            task, seed, int(pairs) + 1, self.prompter.resolution
        )  # + the query's pair
        names = [f"{i:02d}_{'x' if i % 2 == 0 else 'y'}{i // 2 + 1}" for i in range(len(sentence.prompt) - 1)]
        paths = self._save(
            [resolve_image(im) for im in sentence.images], "preset", [*names, "query", "truth"]
        )
        return paths[:-1], paths[-1]

    @on_page
    def run_analogy(self, files, truth, candidates, temperature, top_k, seed, progress=gr.Progress()):  # noqa: B008
        images = self.check_analogy(files)
        total = int(candidates) * self.prompter.tokens_per_image
        sampling = self._sampling(temperature, top_k, seed, total, progress)
        result = self.prompter.analogy(images, int(candidates), truth or None, **sampling)
        return self._outputs(result, "analogy")

    # -- video --------------------------------------------------------------------------------------------
    def check_frames(self, files: list[str] | None) -> list[Image.Image]:
        frames = read_uploads(files, "frame")
        window = self.prompter.window_frames()
        if len(frames) > window:
            raise ValueError(
                f"{len(frames)} frames are more than the model's context holds ({window} frames beside the one "
                f"it generates, {self.prompter.model.config.max_position_embeddings} positions): upload the last "
                f"{window} frames"
            )
        return frames

    def preview_frames(self, files):
        def shown(frames):
            return [(frame, f"frame {i + 1}") for i, frame in enumerate(frames)], f"{len(frames)} frame(s)"

        return preview(files, self.check_frames, shown)

    @on_page
    def video_preset(self, index: float, count: float):
        """Shapes moving at constant speed (held-out seeds): `count` frames in, the following ones as truth."""
        count = min(int(count), self.prompter.window_frames())
        seed = procedural_seeds("heldout", 1, start=int(index))[0]
        sentence, _ = moving_shapes(seed, count + 4, self.prompter.resolution)
        paths = self._save(sentence.images, "clip", [f"frame{i:02d}" for i in range(len(sentence.images))])
        return paths[:count], paths[count:]

    @on_page
    def run_video(self, files, truth, n_frames, temperature, top_k, seed, progress=gr.Progress()):  # noqa: B008
        frames = self.check_frames(files)
        n_frames = int(n_frames)
        sampling = self._sampling(
            temperature, top_k, seed, n_frames * self.prompter.tokens_per_image, progress
        )
        known = (truth or [])[:n_frames] or None
        result = self.prompter.continue_sequence(frames, n_frames, 1, known, **sampling)
        return self._outputs(result, "video")

    # -- model info ---------------------------------------------------------------------------------------
    def info(self) -> str:
        model, vq, p = self.prompter.model, self.prompter.tokenizer, self.prompter
        c, t = model.config, vq.config
        n_vq = sum(x.numel() for x in vq.parameters())
        pairs = (c.max_position_embeddings - int(p.use_bos)) // p.tokens_per_image // 2 - 1
        rows = [
            ("LVM", f"`{self.sources['lvm']}`"),
            ("LVM preset", c.name),
            ("LVM parameters", f"{model.num_params():,} ({model.num_params(non_embedding=True):,} non-embedding)"),
            ("LVM shape", f"{c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads "
                          f"({c.num_kv_heads} key/value), vocab {c.vocab_size}"),
            ("context", f"{c.max_position_embeddings} positions: {p.window_frames()} video frames, "
                        f"up to {pairs} example pairs; BOS {'on' if p.use_bos else 'off'}"),
            ("tokenizer", f"`{self.sources['tokenizer']}`"),
            ("tokenizer preset", t.name),
            ("tokenizer parameters", f"{n_vq:,}"),
            ("tokenizer shape", f"{t.resolution} px, f{t.downsample_factor}, {p.tokens_per_image} tokens per image, "
                                f"{t.codebook_size} codes"),
            ("device", f"{p.device} ({next(model.parameters()).dtype}), torch {torch.__version__}"),
        ]  # fmt: skip
        rows += self.chat.info_rows() if self.chat else []
        return "| model | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def gallery(label: str, elem_id: str) -> gr.Gallery:
    return gr.Gallery(
        label=label, columns=4, height="auto", format="png", object_fit="contain", elem_id=elem_id
    )


def inputs(files_label: str, tab: str) -> tuple:
    """The uploaded files, a line saying what they are (or what is wrong), and the images in order."""
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(file_count="multiple", label=files_label, elem_id=f"{tab}-files")
            status = gr.Markdown(elem_id=f"{tab}-status")
        shown = gallery("in order", f"{tab}-shown")
    return files, status, shown


def controls(tab: str, count: gr.Slider, button: str) -> tuple:
    """Temperature, top-k and seed beside `count` (element ids `<tab>-temperature`, ..), and the button."""
    with gr.Row():
        count.render()
        temperature = gr.Slider(
            0, 2, value=1.0, step=0.05, label="temperature (0 = greedy)", elem_id=f"{tab}-temperature"
        )
        top_k = gr.Number(value=100, precision=0, minimum=0, label="top-k (0 = all)", elem_id=f"{tab}-top-k")
        seed = gr.Number(value=0, precision=0, label="seed (-1 = random)", elem_id=f"{tab}-seed")
    return temperature, top_k, seed, gr.Button(button, variant="primary", elem_id=f"{tab}-run")


def outputs(tab: str, label: str, grid_label: str) -> tuple:
    """The generated images, the grid (enlarged on the page) and the grid PNG to download."""
    with gr.Row():
        images = gallery(label, f"{tab}-out")
        with gr.Column():
            grid = gr.Image(label=grid_label, format="png", type="pil", elem_id=f"{tab}-grid")
            download = gr.File(label="download the grid", elem_id=f"{tab}-grid-file")
    return images, grid, download


def build_app(app: App) -> gr.Blocks:
    with gr.Blocks(title="LVM", analytics_enabled=False) as page:
        gr.Markdown("# LVM: in-context prompting" + (" and VLM chat" if app.chat else ""))
        with gr.Tab("In-context", id="incontext"):
            gr.Markdown("Example pairs `x1 y1 x2 y2 ...` then a query `xq`; files are taken in name order.")
            truth = gr.State(None)
            with gr.Row():
                task = gr.Dropdown(list(TASKS), value="recolor", label="held-out task")
                example = gr.Number(value=0, precision=0, minimum=0, label="example #")
                pairs = gr.Slider(1, 7, value=3, step=1, label="example pairs")
                load = gr.Button("Load example", elem_id="incontext-load")
            files, status, shown = inputs("prompt images (or upload your own)", "incontext")
            candidates = gr.Slider(1, 8, value=2, step=1, label="candidates", render=False)
            temperature, top_k, seed, run = controls("incontext", candidates, "Generate")
            answers, grid, download = outputs("incontext", "answers", "grid: prompt | answers | truth")

            load.click(app.analogy_preset, [task, example, pairs], [files, truth], concurrency_limit=None)
            files.upload(lambda: None, None, truth, concurrency_limit=None)  # own images: no known answer
            files.change(app.preview_analogy, files, [shown, status], concurrency_limit=None)
            run.click(
                app.run_analogy,
                [files, truth, candidates, temperature, top_k, seed],
                [answers, grid, download],
                concurrency_id=MODEL_CALLS,
            )

        with gr.Tab("Video", id="video"):
            gr.Markdown("A few frames (in file-name order) in, the next frames out.")
            clip_truth = gr.State(None)
            with gr.Row():
                clip = gr.Number(value=0, precision=0, minimum=0, label="example clip #")
                clip_frames = gr.Slider(1, 15, value=4, step=1, label="frames in")
                load_clip = gr.Button("Load example", elem_id="video-load")
            frame_files, frame_status, frames = inputs("frames", "video")
            n_frames = gr.Slider(1, 8, value=2, step=1, label="frames to generate", render=False)
            v_temperature, v_top_k, v_seed, go = controls("video", n_frames, "Continue")
            following, v_grid, v_download = outputs(
                "video", "next frames", "grid: frames | generated | truth"
            )

            load_clip.click(
                app.video_preset, [clip, clip_frames], [frame_files, clip_truth], concurrency_limit=None
            )
            frame_files.upload(lambda: None, None, clip_truth, concurrency_limit=None)
            frame_files.change(
                app.preview_frames, frame_files, [frames, frame_status], concurrency_limit=None
            )
            go.click(
                app.run_video,
                [frame_files, clip_truth, n_frames, v_temperature, v_top_k, v_seed],
                [following, v_grid, v_download],
                concurrency_id=MODEL_CALLS,
            )

        if app.chat is not None:
            with gr.Tab("VLM chat", id="chat"):
                chat_tab(app.chat, MODEL_CALLS)
            if app.chat.vlm.config.generation is not None:  # a VLM that also writes images
                with gr.Tab("Draw", id="draw"):
                    draw_tab(app.chat, MODEL_CALLS)

        with gr.Tab("Model info", id="info"):
            gr.Markdown(app.info(), elem_id="model-info")
    # One model call at a time: every generating event shares MODEL_CALLS, limited to 1.
    page.queue(default_concurrency_limit=1)
    return page


def load_prompter(args: argparse.Namespace) -> InContextPrompter:
    for flag, path in (("--lvm", args.lvm), ("--tokenizer", args.tokenizer)):
        if not (Path(path) / "config.json").exists() and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no model there; run `make demo` first, or pass {flag} DIR")
    tokenizer = VQGAN.from_pretrained(args.tokenizer).to(args.device)
    model = LVM.from_pretrained(args.lvm, dtype=getattr(torch, args.dtype)).to(args.device)
    return InContextPrompter(model, tokenizer, use_bos=not args.no_bos, context_frames=args.context_frames)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lvm", default=DEMO_LVM, help="LVM directory (HF Llama layout); default: make demo's"
    )
    parser.add_argument("--tokenizer", default=DEMO_TOKENIZER, help="VQGAN checkpoint; default: make demo's")
    parser.add_argument("--vlm", help="a VLM directory (vlm.VLM.from_pretrained): adds the chat tab")
    parser.add_argument(
        "--vlm-tokenizer", help="the VLM's text tokenizer directory; default: the --vlm directory"
    )
    parser.add_argument("--no-bos", action="store_true", help="prompt without BOS (the released LVM-7B)")
    parser.add_argument(
        "--context-frames", type=int, default=CONTEXT_FRAMES, help="video: sliding window of frames"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="LVM weights"
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the page's server
    try:
        prompter = load_prompter(args)
        chat = Chat.load(args.vlm, args.vlm_tokenizer, args.device) if args.vlm else None
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    workdir = Path(tempfile.mkdtemp(prefix="lvm-app-"))
    app = App(prompter, workdir, {"lvm": args.lvm, "tokenizer": args.tokenizer}, chat)
    page = build_app(app)
    print(f"serving on http://{args.host}:{args.port}", flush=True)
    page.launch(
        server_name=args.host, server_port=args.port, allowed_paths=[str(workdir)], ssr_mode=False,
        css=CSS, footer_links=[], quiet=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()
