"""In-context prompting from the command line; the logic is lvm.prompting's.

One prompt (an analogy: pairs then the query; or frames to continue), its grid written to --out:
    python scripts/prompt.py --model runs/lvm --tokenizer runs/vqgan \\
        --images x1.png y1.png x2.png y2.png xq.png --truth yq.png --candidates 4 --out grid.png
    python scripts/prompt.py --model .. --tokenizer .. --mode sequence --frames 3 --images f*.png --out next.png

A batch, as LVM's batch_generation: a jsonl of {"images": [...], "output": "grid.png"} lines (optional
"truth", "mode", "frames"; paths relative to the jsonl). Every job is checked before the model loads;
jobs whose output exists are skipped, so an interrupted batch resumes:
    python scripts/prompt.py --model .. --tokenizer .. --jobs prompts.jsonl

Grids: one row per candidate, prompt | generation | ground truth.

Drawing from text with a VLM that writes images (configs/unified; --model is the VLM, --tokenizer its text
tokenizer), after (image, caption) examples for in-context generation (EMU2); the grid: caption | examples | drawn,
the one whose caption the model reads back best (lowest NLL) first:
    python scripts/prompt.py --model runs/demo/unified/export --tokenizer runs/demo/vlm/tokenizer \
        --draw "a small red circle on the left on a plain white background" --example a.png "a blue square ..." \
        --candidates 4 --temperature 1.0 --out drawn.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from lvm.prompting import (
    MODES,
    PromptJob,
    add_prompter_arguments,
    prompter_from_args,
    read_jobs,
    sampling_from_args,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompter_arguments(parser, temperature=1.0)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", help="prompt images, in sentence order")
    inputs.add_argument("--jobs", help="jsonl of prompts, one per line")
    inputs.add_argument("--draw", metavar="CAPTION", help="draw CAPTION with a VLM that writes images")
    parser.add_argument("--example", nargs=2, action="append", default=[], metavar=("IMAGE", "CAPTION"),
                        help="an in-context example for --draw (repeatable)")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance of --draw")
    parser.add_argument("--out", help="grid PNG for --images")
    parser.add_argument("--truth", nargs="+", default=[], help="known answer / next frames, shown in the grid")
    parser.add_argument("--mode", choices=MODES, default="analogy", help="default mode of jsonl lines too")
    parser.add_argument("--frames", type=int, default=1, help="frames to generate in sequence mode")
    parser.add_argument("--candidates", type=int, default=1, help="generations per prompt")
    parser.add_argument("--overwrite", action="store_true", help="redo jobs whose output exists")
    args = parser.parse_args(argv)
    if (args.images or args.draw) and not args.out:
        parser.error("--images and --draw need --out")
    if args.draw:
        return draw_main(args)

    try:
        if args.jobs:
            jobs = read_jobs(args.jobs, args.mode, args.frames)
        else:
            jobs = [PromptJob(args.images, args.out, args.mode, args.truth, args.frames)]
            jobs[0].check()
        todo = [job for job in jobs if args.overwrite or not Path(job.output).exists()]
        prompter = prompter_from_args(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    for job in tqdm(todo, desc="prompts", unit="prompt", disable=len(todo) < 2):
        job.run(prompter, args.candidates, **sampling_from_args(args)).save_grid(job.output)
    print(f"wrote {len(todo)} grid(s), skipped {len(jobs) - len(todo)} already written")


def draw_main(args: argparse.Namespace) -> None:
    """--draw: `candidates` images of the caption (seeds seed, seed + 1, ...) after the examples, as one grid,
    the one the model reads back best first (vlm.draw.caption_nll: the caption's NLL after the image)."""
    from tokenizer.images import resolve_image
    from vlm.chat import Chat
    from vlm.draw import caption_nll, draw_candidates
    from vlm.unified_demo import save_draw_grid

    try:
        examples = [(caption, resolve_image(path, "--example image")) for path, caption in args.example]
        chat = Chat.load(args.model, args.tokenizer, args.device)
        options = {"guidance_scale": args.guidance_scale, "temperature": args.temperature, "top_k": args.top_k,
                   "top_p": args.top_p}  # fmt: skip
        drawn = [images[0] for images in draw_candidates(chat, [args.draw], args.candidates, examples, args.seed or 0, **options)]
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    ranked = sorted(zip(caption_nll(chat, drawn, [args.draw] * len(drawn)), range(len(drawn)), drawn, strict=True))
    size = drawn[0].size
    columns = {f"example {i + 1}": [image.convert("RGB").resize(size)] for i, (_, image) in enumerate(examples)}
    columns |= {f"seed {(args.seed or 0) + i}, nll {nll:.1f}": [image] for nll, i, image in ranked}
    save_draw_grid(Path(args.out), [args.draw], columns)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
