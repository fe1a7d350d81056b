"""The unified stage of `make demo` (scripts/demo.py calls `run` after the VLM stage): the demo VLM learns to
draw the procedural scenes it reads.

1. train: the VLM stage's SFT export given a generation side (the demo VQGAN of stage 1: 32 px -> 64 codes)
   on the VLM stage's scene shards, mixing understanding, generation and interleaved documents
   (configs/unified/demo.yaml, vlm.unified.UnifiedModule)
2. draw held-out captions with guidance (vlm.draw), 4 candidates each, keep the one whose caption the model
   reads back most likely (vlm.draw.best_read), and score each image's attributes with the scene generator's
   own renderer (vlm.scene_check): colour, shape and position per described shape; also the first candidate
   alone; baselines: the same model with an empty caption (nothing to judge by: one candidate), and with
   another scene's caption (judged by that caption); the ceiling: the true scene after a VQ round trip
3. read: QA exact match of the same model on held-out scenes (vlm.evaluation.score_scenes)
4. a PNG grid: caption | best of 4 | one sample | empty caption | shuffled caption | truth, labelled
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG = "configs/unified/demo.yaml"
# Sampled, not greedy: greedy decoding with guidance collapses onto the background codes (measured: the drawn
# attribute accuracy falls below the empty caption's). Temperature 0.7 and top-k 16 draw fewer stray codes than
# 1.0 / 32: on 384 other held-out captions (seeds from 1000, not the scored ones) the margin over the shuffled
# caption rose from 0.056 to 0.085 (README, "Training a model that reads and writes images").
SAMPLING = dict(guidance_scale=5.0, temperature=0.7, top_k=16, seed=0)
FULL = dict(steps=600, draw_scenes=128, candidates=4, qa_scenes=16, grid_rows=10, sampling=SAMPLING)
SMOKE = dict(steps=2, draw_scenes=2, candidates=2, qa_scenes=1, grid_rows=2, sampling=SAMPLING)


def cpu_seconds() -> float:
    """user + sys CPU time of this process and its finished children (the training subprocess)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(out: Path, train, smoke: bool = False) -> dict:
    """train(config, run_dir, extra_args) -> export dir (scripts/demo.py). Needs the tokenizer stage's VQGAN
    (<out>/tokenizer/export) and the VLM stage's outputs (<out>/vlm)."""
    from vlm import VLM
    from vlm.chat import Chat
    from vlm.text import load_text_tokenizer

    settings = SMOKE if smoke else FULL
    start = cpu_seconds()
    out, vlm_dir = Path(out), Path(out) / "vlm"
    generation = {"tokenizer": {"kind": "vqgan", "path": str(out / "tokenizer" / "export")}, "embed_dim": 16}
    tokenizer = str(vlm_dir / "tokenizer")
    export = train(CONFIG, out / "unified", [
        "--model.init_from", str(vlm_dir / "sft" / "export"), "--model.tokenizer", tokenizer,
        "--model.generation", json.dumps(generation), "--data.tokenizer", tokenizer,
        "--data.train", str(vlm_dir / "shards" / "train"), "--data.val", str(vlm_dir / "shards" / "val"),
        "--trainer.max_steps", str(settings["steps"]), "--trainer.val_check_interval", str(settings["steps"]),
    ])  # fmt: skip
    trained = cpu_seconds()
    # all held-out captions in one batch: drawing with this small model is per-step overhead (128 captions: 2.4 s in
    # batches of 32, 1.6 s in one)
    chat = Chat(VLM.from_pretrained(export), load_text_tokenizer(tokenizer), batch_size=settings["draw_scenes"])
    metrics = score(chat, settings, out / "unified")
    metrics["cpu_s"] = {"train": round(trained - start, 1), "draw_and_score": round(cpu_seconds() - trained, 1)}
    return metrics


def score(chat, settings: dict, out: Path) -> dict:
    """Attribute accuracy of drawn held-out captions against the baselines; QA exact match; the grid."""
    import torch

    from tokenizer import to_pil, to_tensor
    from vlm.draw import best_read, draw, draw_candidates
    from vlm.evaluation import score_scenes
    from vlm.scene_check import attribute_accuracy
    from vlm.scenes import Scene, scene_seeds

    scenes = [Scene.random(seed) for seed in scene_seeds("heldout", settings["draw_scenes"])]
    captions = [scene.caption() for scene in scenes]
    size = chat.vlm.gen_tokenizer.config.resolution
    truth = [scene.render(size) for scene in scenes]
    with torch.no_grad():
        round_trip = to_pil(chat.vlm.decode_images(chat.vlm.encode_images(to_tensor(truth).to(chat.device))))
    sampling, shuffled = settings["sampling"], captions[1:] + captions[:1]  # each shuffled one scored on its neighbour
    best = f"best of {settings['candidates']}"
    rounds = {name: draw_candidates(chat, texts, settings["candidates"], **sampling)
              for name, texts in (("generated", captions), ("shuffled caption", shuffled))}  # fmt: skip
    drawn = {
        best: best_read(chat, rounds["generated"], captions),
        "one sample": rounds["generated"][0],
        "empty caption": draw(chat, [""] * len(scenes), **sampling),
        "shuffled caption": best_read(chat, rounds["shuffled caption"], shuffled),
        "shuffled, one sample": rounds["shuffled caption"][0],
    }
    reported = {"model": best, "unconditional": "empty caption", "shuffled_caption": "shuffled caption",
                "model_one_sample": "one sample", "shuffled_caption_one_sample": "shuffled, one sample"}  # fmt: skip
    per_attribute = {key: attribute_accuracy(drawn[name], scenes) for key, name in reported.items()}
    per_attribute["vq_round_trip"] = attribute_accuracy(round_trip, scenes)  # the ceiling
    shown = (best, "one sample", "empty caption", "shuffled caption")
    qa = score_scenes(chat, settings["qa_scenes"])
    rows = settings["grid_rows"]
    save_draw_grid(out / "draw_grid.png", captions[:rows],
                   {**{name: drawn[name][:rows] for name in shown}, "truth": truth[:rows]})
    return {
        "t2i_attribute_accuracy": {key: result["accuracy"] for key, result in per_attribute.items()},
        "t2i_per_attribute": per_attribute,
        "candidates": settings["candidates"],
        "i2t_exact_match": qa["qa_exact_match"],
        "caption_f1": qa["caption_f1"],
        "scenes": len(scenes),
        "sampling": sampling,
        "grid": str(out / "draw_grid.png"),
    }  # fmt: skip


def save_draw_grid(path: Path, captions: list[str], columns: dict) -> None:
    """One row per caption: the caption (wrapped) | one image per column, nearest-neighbour upscaled, labelled."""
    import textwrap

    from PIL import Image, ImageDraw

    from lvm.figures import display_side
    from lvm.prompting import save_png

    cell, text_width, header = display_side(next(iter(columns.values()))[0].height), 240, 20
    canvas = Image.new("RGB", (text_width + len(columns) * (cell + 4), header + len(captions) * (cell + 4)), "white")
    pen = ImageDraw.Draw(canvas)
    for x, title in zip([4, *(text_width + i * (cell + 4) for i in range(len(columns)))], ["caption", *columns], strict=True):
        pen.text((x, 4), title, fill="black")
    for row, caption in enumerate(captions):
        y = header + row * (cell + 4)
        pen.multiline_text((4, y + 4), "\n".join(textwrap.wrap(caption, text_width // 6 - 2)[: cell // 12]), fill="black")
        for column, images in enumerate(columns.values()):
            canvas.paste(images[row].resize((cell, cell), Image.NEAREST), (text_width + column * (cell + 4), y))
    save_png(canvas, path)


def table_lines(metrics: dict) -> list[str]:
    t2i, qa = metrics["t2i_attribute_accuracy"], metrics["i2t_exact_match"]
    judgements = metrics["t2i_per_attribute"]["model"]["judgements"]
    return [
        f"{'unified, held-out scenes':<28}{'model':>8}{'empty caption':>15}{'shuffled caption':>18}{'VQ of truth':>13}"
        f"   ({judgements} judgements, standard error <= {0.5 / max(judgements, 1) ** 0.5:.3f})",
        f"{'t2i attribute accuracy':<28}{t2i['model']:>8.3f}{t2i['unconditional']:>15.3f}{t2i['shuffled_caption']:>18.3f}"
        f"{t2i['vq_round_trip']:>13.3f}   (best of {metrics['candidates']} by the model's own reading)",
        f"{'  one sample':<28}{t2i['model_one_sample']:>8.3f}{t2i['unconditional']:>15.3f}"
        f"{t2i['shuffled_caption_one_sample']:>18.3f}",
        f"{'i2t QA exact match':<28}{qa['model']:>8.3f}   (blank image {qa['blank_image']:.3f}, text only {qa['text_only']:.3f})",
    ]
