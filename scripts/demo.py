"""The main job on the embedded demo data, end to end (`make demo`). Stages whose outputs exist are reused.

1. train the `vqgan_demo` tokenizer through the Lightning CLI on the embedded photos
   (configs/tokenizer/demo.yaml) -> runs/demo/tokenizer/vqgan
2. score it on the held-out photos: L1 / PSNR and a PNG grid of originals over reconstructions
3. tokenize procedural analogy sentences with it into webdataset shards -> runs/demo/shards/

Writes runs/demo/metrics.json and prints a table.
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
from tokenizer import VQGAN, to_tensor
from tokenizer.files import atomic_path

ROOT = Path(__file__).resolve().parents[1]


def train_tokenizer(out: Path, extra_args: list[str]) -> VQGAN:
    """configs/tokenizer/demo.yaml through the CLI, its outputs redirected under `out`; resumes from
    the last checkpoint when a previous run was interrupted."""
    run = out / "tokenizer"
    exported = run / "vqgan"
    if not (exported / "model.safetensors").exists():
        command = [
            sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/tokenizer/demo.yaml"),
            "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
            "--trainer.callbacks.init_args.dirpath", str(run / "checkpoints"), "--model.export_dir", str(exported),
        ]  # fmt: skip
        if (run / "checkpoints" / "last.ckpt").exists():
            command += ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
        subprocess.run([*command, *extra_args], check=True)
    return VQGAN.from_pretrained(exported)


@torch.no_grad()
def score_tokenizer(vq: VQGAN, out: Path) -> dict:
    images = to_tensor(embedded_photos("val"), vq.config.resolution)
    recon = vq.decode(vq.encode(images))
    mse = (images - recon).pow(2).mean(dim=(1, 2, 3))
    torchvision.utils.save_image(torch.cat([images, recon]), out / "tokenizer_reconstructions.png", nrow=len(images))
    return {"val_l1": float((images - recon).abs().mean()), "val_psnr": float((-10 * mse.log10()).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--sentences", type=int, default=256, help="procedural sentences to tokenize")
    parser.add_argument("--tokenizer-args", nargs=argparse.REMAINDER, default=[], help="extra train.py arguments")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    vq = train_tokenizer(out, args.tokenizer_args)
    metrics = {"tokenizer": score_tokenizer(vq, out)}
    sentences = sentences_from_spec(
        "procedural", split="train", image_size=vq.config.resolution, count=args.sentences, images_per_sentence=8
    )
    shard_dir = out / "shards" / "procedural-train"
    tokenize_to_shards(sentences, vq, shard_dir, samples_per_shard=64)
    manifest = write_manifest(shard_dir)
    metrics["shards"] = {"shards": len(manifest["shards"]), **{k: manifest[k] for k in ("samples", "images", "tokens")}}

    with atomic_path(out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2))
    print(f"\n{'stage':<12}{'metric':<18}{'value':>12}")
    for stage, values in metrics.items():
        for key, value in values.items():
            print(f"{stage:<12}{key:<18}{value:>12.4g}")
    print(f"\ngrids and metrics in {out}/")


if __name__ == "__main__":
    main()
