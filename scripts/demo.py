"""The main job on the embedded demo data, end to end (`make demo`). Stages whose outputs exist are reused.

1. tokenizer: train `vqgan_demo` through the Lightning CLI (configs/tokenizer/demo.yaml) on the
   embedded photos and procedural task images; score it on held-out photos (L1, PSNR, PNG grid)
2. shards: tokenize procedural analogy sentences (training seeds; held-out seeds for validation)
3. lvm: train `vqlm_demo` through the Lightning CLI (configs/lvm/demo.yaml) on those shards
4. score: free-running answers to held-out analogy prompts against two baselines (copy the query;
   the same model without the example pairs): token accuracy, changed-token accuracy, PSNR

Writes <out>/metrics.json and PNG grids, and prints a table. `--smoke` shrinks every stage (tests).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from data.photos import embedded_photos
from data.shards import write_manifest
from data.sources import sentences_from_spec
from data.tokenize import tokenize_to_shards
from lvm import LVM
from lvm.checkpoints import atomic_path
from lvm.evaluation import heldout_analogies, score_analogies
from lvm.prompting import InContextPrompter
from tokenizer import VQGAN, to_tensor
from tokenizer.images import psnr

ROOT = Path(__file__).resolve().parents[1]
# Tasks whose answers are position-aligned with the query; segmentation's palette is drawn per sentence,
# so only the examples tell the model which colours to paint.
TASKS = ("segmentation", "recolor", "edges", "colorize")
PAIRS_PER_SENTENCE = 4  # 8 images x 64 tokens + BOS/EOS = 514 tokens: two sentences fill a 1028-token row

FULL = dict(train_sentences=1600, val_sentences=64, eval_per_task=16, tokenizer_args=[], lvm_args=[])
SMOKE = dict(
    train_sentences=16, val_sentences=8, eval_per_task=1,
    tokenizer_args=["--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                    "--data.train_samples_per_epoch", "16", "--data.val_zooms", "1", "--data.val_procedural", "2"],
    lvm_args=["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--model.warmup_steps", "1",
              "--data.batch_size", "1"],
)  # fmt: skip


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
    subprocess.run([*command, *extra_args], check=True)
    return exported


@torch.no_grad()
def score_tokenizer(vq: VQGAN, out: Path) -> dict:
    images = to_tensor(embedded_photos("val"), vq.config.resolution)
    recon = vq.decode(vq.encode(images))
    torchvision.utils.save_image(torch.cat([images, recon]), out / "tokenizer_reconstructions.png", nrow=len(images))
    return {"val_l1": float((images - recon).abs().mean()), "val_psnr": float(psnr(recon, images).mean())}


def make_shards(vq: VQGAN, directory: Path, split: str, count: int) -> dict:
    if not (directory / "manifest.json").exists():
        spec = "procedural:" + ",".join(TASKS)
        sentences = sentences_from_spec(
            spec, split=split, image_size=vq.config.resolution, count=count, images_per_sentence=2 * PAIRS_PER_SENTENCE
        )
        tokenize_to_shards(sentences, vq, directory, samples_per_shard=256)
    manifest = write_manifest(directory)
    return {"shards": len(manifest["shards"]), "sentences": manifest["samples"], "tokens": manifest["tokens"]}


def print_table(metrics: dict) -> None:
    print(f"\n{'tokenizer (held-out photos)':<34}" + "".join(f"{k}={v:.4g}  " for k, v in metrics["tokenizer"].items()))
    print(f"{'shards':<34}" + "".join(f"{k}={v}  " for k, v in metrics["shards"].items()))
    methods = ("model", "copy_query", "no_context")
    print(f"\n{'held-out analogies':<26}" + "".join(f"{m:>12}" for m in methods))
    for key in ("token_accuracy", "changed_token_accuracy", "psnr"):
        print(f"{key:<26}" + "".join(f"{metrics[key][m]:>12.4f}" for m in methods))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--smoke", action="store_true", help="a tiny run of every stage (for tests)")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print("== 1/4 tokenizer", flush=True)
    vq = VQGAN.from_pretrained(train_with_cli("configs/tokenizer/demo.yaml", out / "tokenizer", settings["tokenizer_args"]))
    metrics = {"tokenizer": score_tokenizer(vq, out)}

    print("== 2/4 shards", flush=True)
    train_dir, val_dir = out / "shards" / "train", out / "shards" / "val"
    metrics["shards"] = make_shards(vq, train_dir, "train", settings["train_sentences"])
    make_shards(vq, val_dir, "heldout", settings["val_sentences"])

    print("== 3/4 lvm", flush=True)
    lvm_args = ["--data.train", str(train_dir), "--data.val", str(val_dir), *settings["lvm_args"]]
    model = LVM.from_pretrained(train_with_cli("configs/lvm/demo.yaml", out / "lvm", lvm_args))

    print("== 4/4 score held-out analogies", flush=True)
    # held-out seeds: never in the training shards (the validation shards share the range, never trained on)
    sentences = heldout_analogies(TASKS, settings["eval_per_task"], PAIRS_PER_SENTENCE, vq.config.resolution)
    sentences.sort(key=lambda sentence: sentence.meta["seed"])  # tasks take turns, so the grids show each
    prompter = InContextPrompter(model, vq)
    scores = score_analogies(prompter, sentences, grid_dir=out / "grids", num_grids=2 * len(TASKS), progress=True)
    metrics.update(scores)

    with atomic_path(out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2))
    print_table(metrics)
    print(f"\nPNG grids and metrics.json in {out}/")
    return metrics


if __name__ == "__main__":
    main()
