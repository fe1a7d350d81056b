"""Evaluate an LVM; the logic is lvm.evaluation's.

perplexity: exp of the mean NLL of the target images' tokens given the prompt images
    python scripts/eval.py perplexity --model runs/lvm --tokenizer runs/vqgan \\
        --prompt x1.png y1.png x2.png --target y2.png

analogies: free-running (greedy by default) answers to held-out procedural analogies with known answers,
scored beside the copy-query and no-context baselines; writes metrics.json and a labelled grid per task to --out
    python scripts/eval.py analogies --model runs/lvm --tokenizer runs/vqgan --tasks flip,recolor \\
        --per-task 16 --n-shots 3 --out runs/eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.procedural import TASKS
from lvm.checkpoints import atomic_path
from lvm.evaluation import heldout_analogies, metrics_table, perplexity, score_analogies
from lvm.figures import save_task_grids
from lvm.prompting import add_prompter_arguments, prompter_from_args, sampling_from_args


def main(argv: list[str] | None = None) -> dict | float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ppl = commands.add_parser("perplexity", help="perplexity of target images given prompt images")
    add_prompter_arguments(ppl, temperature=0.0)
    ppl.add_argument("--prompt", nargs="*", default=[], help="prompt images (none: the targets after BOS alone)")
    ppl.add_argument("--target", nargs="+", required=True, help="target images")
    ana = commands.add_parser("analogies", help="score in-context analogies with known answers")
    add_prompter_arguments(ana, temperature=0.0)
    ana.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    ana.add_argument("--per-task", type=int, default=8, help="held-out sentences per task")
    ana.add_argument("--n-shots", type=int, default=3, help="pairs per sentence, the last one the query")
    ana.add_argument("--batch-size", type=int, default=8)
    ana.add_argument("--grid-rows", type=int, default=4, help="held-out prompts shown per task grid")
    ana.add_argument("--candidates", type=int, default=1, help="answers drawn per prompt; the likeliest is kept")
    ana.add_argument("--out", required=True, help="directory for metrics.json and grids/")
    args = parser.parse_args(argv)

    try:
        prompter = prompter_from_args(args)
        if args.command == "perplexity":
            value = perplexity(prompter, args.prompt, args.target)
            print(f"perplexity {value:.4f}")
            return value
        sentences = heldout_analogies(args.tasks.split(","), args.per_task, args.n_shots, prompter.resolution)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        scores, examples = score_analogies(
            prompter, sentences, args.batch_size, keep_examples=args.grid_rows, progress=True,
            num_candidates=args.candidates, **sampling_from_args(args),
        )  # fmt: skip
    except ValueError as error:
        sys.exit(f"error: {error}")
    scores["grids"] = [str(p) for p in save_task_grids(examples, out / "grids")]
    with atomic_path(out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(scores, indent=2))
    print("\n".join(metrics_table(scores)))
    print("grids: " + " ".join(scores["grids"]))
    return scores


if __name__ == "__main__":
    main()
