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
    parser.add_argument("--out", help="grid PNG for --images")
    parser.add_argument("--truth", nargs="+", default=[], help="known answer / next frames, shown in the grid")
    parser.add_argument("--mode", choices=MODES, default="analogy", help="default mode of jsonl lines too")
    parser.add_argument("--frames", type=int, default=1, help="frames to generate in sequence mode")
    parser.add_argument("--candidates", type=int, default=1, help="generations per prompt")
    parser.add_argument("--overwrite", action="store_true", help="redo jobs whose output exists")
    args = parser.parse_args(argv)
    if args.images and not args.out:
        parser.error("--images needs --out")

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


if __name__ == "__main__":
    main()
