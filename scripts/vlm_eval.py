"""Score a VLM on a folder of questions or a LLaVA-format JSON: VQA accuracy (VQAv2 normalisation), multiple
choice accuracy, captioning BLEU-1..4 / ROUGE-L / CIDEr-D; the logic is vlm.benchmark's and vlm.metrics'.

    python -m scripts.vlm_eval --model runs/vlm/sft/export --tokenizer runs/vlm/tokenizer --data EVAL --out runs/vlm/eval

EVAL is a folder holding questions.jsonl (or questions.json) and the images it names, one record per line:
    {"id": "q1", "image": "images/0.png", "question": "What colour is the circle?", "answer": "red", "type": "color"}
    {"id": "q2", "image": "images/0.png", "question": "...", "answers": ["two", "2", ...]}      (several humans)
    {"id": "q3", "image": "images/0.png", "question": "...", "options": ["circle", "square"], "answer": "B"}
    {"id": "c1", "image": "images/0.png", "captions": ["a red circle on the left", ...]}
or a LLaVA JSON file ([{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}], images relative to --images or the file's folder).
vlm.scenes.write_eval_folder(DIR, count) writes such a folder of procedural scenes.

Writes OUT/results.json (scores per task and question type, every prediction, the samples left out and why)
and OUT/grid_<task>.png; prints a table per task. Missing or corrupt images are reported per sample and
excluded from the scores, with their count.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from pathlib import Path

from lvm.checkpoints import atomic_path
from vlm import benchmark
from vlm.chat import Chat
from vlm.evaluation import save_qa_grid


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="a VLM directory (vlm.VLM.from_pretrained)")
    parser.add_argument("--tokenizer", help="its text tokenizer directory (default: --model)")
    parser.add_argument("--data", required=True, help="an evaluation folder or a LLaVA-format JSON file")
    parser.add_argument("--images", help="the image folder of a LLaVA JSON (default: the file's folder)")
    parser.add_argument("--out", required=True, help="directory for results.json and the grids")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="for open and multiple-choice answers")
    parser.add_argument("--caption-tokens", type=int, default=32, help="for captions")
    parser.add_argument("--suffix", default="", help="appended to each open question (e.g. ' Answer in one word.')")
    parser.add_argument("--grid-rows", type=int, default=12, help="questions shown per task grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        items = benchmark.read_eval_set(args.data, args.images)
        chat = Chat.load(args.model, args.tokenizer, args.device, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    kept, images, skipped = benchmark.load_images(items)
    for entry in skipped:
        print(f"left out {entry['id']}: {entry['message']}", file=sys.stderr)
    tokens = {"vqa": args.max_new_tokens, "choice": args.max_new_tokens, "caption": args.caption_tokens}
    predictions = benchmark.predict(chat, kept, images, tokens, args.suffix)
    scores = benchmark.score(kept, predictions)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grids = {}
    for task in scores:
        rows = [i for i, item in enumerate(kept) if item.task == task][: args.grid_rows]
        grids[task] = str(out / f"grid_{task}.png")
        save_qa_grid(Path(grids[task]), [images[i] for i in rows],
                     [kept[i].question or "(caption)" for i in rows], [predictions[i] for i in rows],
                     [kept[i].answers[0] for i in rows])  # fmt: skip
    result = {
        "model": args.model, "data": args.data, "questions": len(items), "scored": len(kept),
        "left_out": len(skipped), "left_out_by_reason": dict(collections.Counter(e["reason"] for e in skipped)), "left_out_samples": skipped,
        "scores": scores, "grids": grids,
        "predictions": [{"id": item.id, "task": item.task, "type": item.type, "question": item.question,
                         "prediction": p, "truth": item.answers} for item, p in zip(kept, predictions, strict=True)],
    }  # fmt: skip
    with atomic_path(out / "results.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2))
    print("\n".join(benchmark.tables(scores)))
    print(f"scored {len(kept)} of {len(items)} questions; left out {len(skipped)} (missing or corrupt images)")
    print(f"results: {out / 'results.json'}; grids: {' '.join(grids.values())}")
    return result


if __name__ == "__main__":
    main()
