"""The VLM stage of `make demo` (scripts/demo.py calls `run`): a small VLM learns to see procedural scenes.

1. text: the embedded byte-level BPE tokenizer (vlm.text.train_default_tokenizer)
2. shards: procedural scenes (captions + short-answer questions), train and held-out seeds (vlm.prepare)
3. align: only the connector trains (configs/vlm/demo.yaml, train_parts [connector])
4. sft: from the align export, the vision tower, connector and LLM train together
5. score held-out scenes: QA exact match (model / blank image / majority answer per question type),
   caption token F1 (model / blank image), and a PNG grid of image | question | answer | truth
Each stage is reused when its outputs exist, like the rest of the demo.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "configs/vlm/demo.yaml"
FULL = dict(train_scenes=3000, heldout_scenes=60, align_steps=30, sft_steps=600, val_every=300)
SMOKE = dict(train_scenes=8, heldout_scenes=2, align_steps=2, sft_steps=2, val_every=2)


def run(out: Path, train, smoke: bool = False) -> dict:
    """train(config, run_dir, extra_args) -> export dir: the demo's way to fit through train.py (scripts/demo.py)."""
    from vlm import VLM
    from vlm.chat import Chat
    from vlm.evaluation import score_scenes
    from vlm.prepare import prepare
    from vlm.text import load_text_tokenizer, train_default_tokenizer

    settings = SMOKE if smoke else FULL
    out = Path(out) / "vlm"
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        train_default_tokenizer(tokenizer_dir)
    train_dir, val_dir = out / "shards" / "train", out / "shards" / "val"
    prepare([f"scenes:{settings['train_scenes']}:train:64:multi"], train_dir, shard_size=256, progress=False)
    prepare([f"scenes:{max(2, settings['heldout_scenes'] // 4)}:heldout:64"], val_dir, shard_size=256, progress=False)
    common = ["--model.tokenizer", str(tokenizer_dir), "--data.tokenizer", str(tokenizer_dir),
              "--data.train", str(train_dir), "--data.val", str(val_dir),
              "--trainer.val_check_interval", str(settings["val_every"])]  # fmt: skip
    align = train(CONFIG, out / "align", [*common, "--model.train_parts", "[connector]", "--model.warmup_steps", "10",
                                        "--trainer.max_steps", str(settings["align_steps"])])
    sft = train(CONFIG, out / "sft", [*common, "--model.init_from", str(align), "--model.vlm", "null",
                                    "--trainer.max_steps", str(settings["sft_steps"])])
    chat = Chat(VLM.from_pretrained(sft), load_text_tokenizer(tokenizer_dir))
    return score_scenes(chat, settings["heldout_scenes"], grid_path=out / "qa_grid.png")


def table_lines(metrics: dict) -> list[str]:
    qa, caption = metrics["qa_exact_match"], metrics["caption_f1"]
    return [
        f"{'VLM, held-out scenes':<26}{'model':>12}{'blank image':>13}{'text only':>11}",
        f"{'QA exact match':<26}{qa['model']:>12.3f}{qa['blank_image']:>13.3f}{qa['text_only']:>11.3f}",
        f"{'caption token F1':<26}{caption['model']:>12.3f}{caption['blank_image']:>13.3f}",
    ]
