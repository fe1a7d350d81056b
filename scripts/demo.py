"""The main job on the embedded demo data, end to end (`make demo`). Stages whose outputs exist are reused.

1. tokenizer: train `vqgan_demo` through the Lightning CLI (configs/tokenizer/demo.yaml) on the
   embedded photos, procedural task images and VLM scenes; score its reconstructions (held-out photos,
   the procedural images of every task, and held-out scenes, which stage 7 draws) and save them as a PNG
2. shards: tokenize procedural analogy sentences (training seeds; held-out seeds for validation)
3. lvm: train `vqlm_demo` through the Lightning CLI (configs/lvm/demo.yaml) on those shards
4. analogies: free-running answers to held-out analogy prompts against two baselines (copy the query;
   the same model without the example pairs): token accuracy, changed-token accuracy, PSNR; a
   labelled grid per task
5. vlm: a small VLM (ViT + connector + the LVM transformer with a BPE vocabulary) trained align -> SFT on
   procedural scenes, scored on held-out scenes against a blank image and the majority answer (vlm/demo.py)
6. unified: that VLM given a generation side (the stage-1 VQGAN) learns to draw scenes from captions;
   the scene renderer scores the drawn attributes against an empty and a shuffled caption (vlm/unified_demo.py)

Each stage is one function that takes the output directory (and what earlier stages made) and returns
its metrics; `main` runs them in order, then `report` writes <out>/metrics.json (one entry per stage),
<out>/summary.png (a few rows per task, the metrics table beside them) and prints the table.
`--smoke` shrinks every stage (tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from data.photos import embedded_photos
from data.shards import write_manifest
from data.sources import sentences_from_spec
from data.tokenize import tokenize_to_shards
from lvm import LVM
from lvm.checkpoints import atomic_path
from lvm.evaluation import heldout_analogies, metrics_table, score_analogies
from lvm.figures import reconstruction_figure, save_task_grids, summary_figure
from lvm.prompting import InContextPrompter, save_png
from scripts.demo_aim import aim_stage, print_aim
from tokenizer import VQGAN, to_pil, to_tensor
from tokenizer.images import reconstruction_psnr
from vlm import demo as vlm_demo
from vlm import unified_demo
from vlm.scenes import Scene, scene_seeds

ROOT = Path(__file__).resolve().parents[1]
# Tasks whose answers are position-aligned with the query; segmentation's palette is drawn per sentence,
# so only the examples tell the model which colours to paint.
TASKS = ("segmentation", "recolor", "edges", "colorize")
PAIRS_PER_SENTENCE = 4  # 8 images x 64 tokens + BOS/EOS = 514 tokens: the LVM's row (configs/lvm/demo.yaml)
SUMMARY_ROWS = 2  # held-out prompts per task in summary.png (the task grids show more)

FULL = dict(train_sentences=1600, val_sentences=64, eval_per_task=16, tokenizer_args=[], lvm_args=[])
SMOKE = dict(
    train_sentences=16, val_sentences=8, eval_per_task=1,
    tokenizer_args=["--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                    "--data.train_samples_per_epoch", "16", "--data.val_zooms", "1", "--data.val_procedural", "2"],
    lvm_args=["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--model.warmup_steps", "1",
              "--data.batch_size", "1", "--model.compile", "false"],
)  # fmt: skip

# What a newcomer does not need to read in the training runs' output (real errors still print):
# wandb's banners and notices (the run stays offline under <run>/wandb), and Lightning's notices
# that are about Lightning itself, not this run (train.py filters those).
QUIET_ENV = {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}


def cpu_precision() -> str:
    """The LVM stage's Trainer precision: bf16-mixed where the CPU has bf16 instructions (AVX512-BF16 or AMX),
    32-true elsewhere, where bf16 matmuls are emulated and slower than fp32. Measured on a 2-core Zen 4: the
    demo LVM's 600 steps ran 1.32x faster (with its compiled blocks) to the same validation loss (1.9582
    against 1.9589 in fp32). The other stages' models are too small to gain: AIM 88 s against 81, the VLM
    stage 280 s against 264, the tokenizer 208 s against 201."""
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native else "32-true"


# -- stages ---------------------------------------------------------------------------------------------------
def train_with_cli(config: str, run: Path, extra_args: list[str]) -> Path:
    """Fit `config` through train.py with its outputs under `run`; resume when a last.ckpt exists.
    Returns the directory the module exports the trained model to."""
    exported = run / "export"
    if (exported / "config.json").exists():
        return exported
    loggers = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run), "name": "csv"}},
        {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": str(run), "project": "lvm-demo"}},
    ]
    command = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / config),
        "--trainer.default_root_dir", str(run), "--trainer.logger", json.dumps(loggers),
        "--trainer.callbacks.init_args.dirpath", str(run / "checkpoints"), "--model.export_dir", str(exported),
    ]  # fmt: skip
    if (run / "checkpoints" / "last.ckpt").exists():
        command += ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    subprocess.run([*command, *extra_args], check=True, env={**os.environ, **QUIET_ENV})
    return exported


def tokenizer_stage(out: Path, settings: dict) -> tuple[VQGAN, dict]:
    """Train the tokenizer; score it on held-out photos, per task on held-out procedural images, and on
    held-out VLM scenes."""
    vq = VQGAN.from_pretrained(train_with_cli("configs/tokenizer/demo.yaml", out / "tokenizer", settings["tokenizer_args"]))
    size = vq.config.resolution
    sets = {"photos": to_tensor(embedded_photos("val"), size)}
    for task in TASKS:  # both sides of every pair of 4 held-out sentences: 32 images per task
        sentences = heldout_analogies([task], 4, PAIRS_PER_SENTENCE, size)
        sets[task] = to_tensor([image for sentence in sentences for image in sentence.images], size)
    sets["scenes"] = to_tensor([Scene.random(seed).render(size) for seed in scene_seeds("heldout", 32)], size)
    psnrs, shown = {}, {}
    for name, images in sets.items():
        psnrs[name], recon = reconstruction_psnr(vq, images)
        shown[f"{name} {psnrs[name]:.1f} dB"] = (to_pil(images[:8]), to_pil(recon[:8]))  # one sentence shown
    save_png(reconstruction_figure(shown), out / "tokenizer_reconstructions.png")
    return vq, {"psnr_photos": psnrs.pop("photos"), "psnr_scenes": psnrs.pop("scenes"), "psnr_procedural": psnrs}


def shards_stage(out: Path, vq: VQGAN, settings: dict) -> tuple[Path, Path, dict]:
    """Procedural analogy sentences -> token shards: training seeds, and held-out seeds for validation."""
    directories = {"train": out / "shards" / "train", "heldout": out / "shards" / "val"}
    counts = {"train": settings["train_sentences"], "heldout": settings["val_sentences"]}
    for split, directory in directories.items():
        if not (directory / "manifest.json").exists():
            spec = "procedural:" + ",".join(TASKS)
            sentences = sentences_from_spec(
                spec, split=split, image_size=vq.config.resolution, count=counts[split],
                images_per_sentence=2 * PAIRS_PER_SENTENCE,
            )  # fmt: skip
            tokenize_to_shards(sentences, vq, directory, samples_per_shard=256)
    manifest = write_manifest(directories["train"])
    metrics = {"shards": len(manifest["shards"]), "sentences": manifest["samples"], "tokens": manifest["tokens"]}
    return directories["train"], directories["heldout"], metrics


def lvm_stage(out: Path, train_dir: Path, val_dir: Path, settings: dict) -> LVM:
    lvm_args = ["--data.train", str(train_dir), "--data.val", str(val_dir), "--trainer.precision", cpu_precision(),
                *settings["lvm_args"]]
    return LVM.from_pretrained(train_with_cli("configs/lvm/demo.yaml", out / "lvm", lvm_args))


def analogies_stage(out: Path, model: LVM, vq: VQGAN, settings: dict) -> tuple[dict, dict]:
    """Score held-out analogies (seeds never in the training shards); a labelled grid per task."""
    sentences = heldout_analogies(TASKS, settings["eval_per_task"], PAIRS_PER_SENTENCE, vq.config.resolution)
    scores, examples = score_analogies(InContextPrompter(model, vq), sentences, progress=True)
    scores["grids"] = [str(path) for path in save_task_grids(examples, out / "grids")]
    return scores, examples


# -- report ---------------------------------------------------------------------------------------------------
def tokenizer_lines(metrics: dict) -> list[str]:
    psnr_by_set = {"photos (held out)": metrics["psnr_photos"], "VLM scenes": metrics["psnr_scenes"],
                   **metrics["psnr_procedural"]}  # fmt: skip
    return ["tokenizer  PSNR dB", *(f"{name}  {value:.2f}" for name, value in psnr_by_set.items())]


def report(out: Path, metrics: dict, examples: dict) -> list[Path]:
    """metrics.json, summary.png, and the console table; returns the pictures' paths."""
    with atomic_path(out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2))
    table = metrics_table(metrics["analogies"])
    summary = save_png(summary_figure(examples, [*table, "", *tokenizer_lines(metrics["tokenizer"])], SUMMARY_ROWS),
                       out / "summary.png")  # fmt: skip
    pictures = [summary, *map(Path, metrics["analogies"]["grids"]), out / "tokenizer_reconstructions.png"]
    print("\n" + "\n".join(tokenizer_lines(metrics["tokenizer"])))
    print(f"shards: {metrics['shards']}")
    print("\nheld-out analogies (changed acc: accuracy on the tokens the answer changes; PSNR of the decoded answer)")
    print("\n".join(table))
    if "vlm" in metrics:
        print("\n" + "\n".join(vlm_demo.table_lines(metrics["vlm"])))
        pictures.append(out / "vlm" / "qa_grid.png")
    if "unified" in metrics:
        print("\n" + "\n".join(unified_demo.table_lines(metrics["unified"])))
        pictures.append(Path(metrics["unified"]["grid"]))
    print("\npictures:\n" + "\n".join(f"  {path}" for path in pictures) + f"\nmetrics: {out / 'metrics.json'}")
    return pictures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--smoke", action="store_true", help="a tiny run of every stage (for tests)")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {}

    print("== 1/7 tokenizer", flush=True)
    vq, metrics["tokenizer"] = tokenizer_stage(out, settings)
    print("== 2/7 shards", flush=True)
    train_dir, val_dir, metrics["shards"] = shards_stage(out, vq, settings)
    print("== 3/7 lvm", flush=True)
    model = lvm_stage(out, train_dir, val_dir, settings)
    print("== 4/7 held-out analogies", flush=True)
    metrics["analogies"], examples = analogies_stage(out, model, vq, settings)
    print("== 5/7 aim: train aim_demo, probe it beside the LVM", flush=True)
    metrics["aim"] = aim_stage(out, vq, model, train_with_cli, smoke=args.smoke)
    print("== 6/7 vlm: align -> SFT on procedural scenes, scored on held-out scenes", flush=True)
    metrics["vlm"] = vlm_demo.run(out, train_with_cli, smoke=args.smoke)
    print("== 7/7 unified: the VLM learns to draw scenes too, scored by the scene renderer", flush=True)
    metrics["unified"] = unified_demo.run(out, train_with_cli, smoke=args.smoke)
    print_aim(metrics["aim"])

    report(out, metrics, examples)  # last: the console ends with the tables and the pictures' paths
    return metrics


if __name__ == "__main__":
    main()
