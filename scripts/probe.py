"""Attentive-probe top-1 of frozen features (lvm/probe.py) on labelled images (data/labelled.py).

    python -m scripts.probe --model runs/demo/aim/export --data digits          # a saved AIM
    python -m scripts.probe --model aim_demo --data digits                      # an AIM preset, random init
    python -m scripts.probe --model runs/demo/lvm/export --tokenizer runs/demo/tokenizer/export --data shapes
    python -m scripts.probe --vlm-encoder '{"kind": "timm", "model_name": "vit_tiny_patch16_224"}' --size 224 --data colors

Prints top-1 on the test split and, last, one JSON line with the settings and the figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from data.labelled import DATASETS, labelled
from lvm.probe import Encoder, aim_encoder, lvm_encoder, probe_top1
from vlm.soup import saved_kind


def load_encoder(model: str | None, tokenizer: str | None, vlm_encoder: str | None,
                 layers: list[int] | None) -> tuple[Encoder, int | None]:  # fmt: skip
    """(encoder, the image size it takes, None if any) from the command line's choice."""
    from lvm.aim import AIM, PRESETS, AIMConfig

    if vlm_encoder:
        from vlm.encoders import build_encoder

        return build_encoder(json.loads(vlm_encoder)).eval(), None
    if model in PRESETS:
        aim = AIM(AIMConfig.from_name(model)).eval()
        return aim_encoder(aim, layers), aim.config.image_size
    if not (Path(model) / "config.json").exists():
        raise SystemExit(f"--model {model}: neither an AIM preset ({', '.join(PRESETS)}) nor a directory with config.json")
    kind = saved_kind(model)
    if kind == "aim":
        aim = AIM.from_pretrained(model).eval()
        return aim_encoder(aim, layers), aim.config.image_size
    if kind != "lvm":
        raise SystemExit(f"--model {model} holds a saved {kind}: the probe takes an AIM or an LVM")
    if not tokenizer:
        raise SystemExit(f"--model {model} is an LVM: pass --tokenizer DIR (the VQGAN its tokens come from)")
    from lvm import LVM
    from tokenizer import VQGAN

    vq = VQGAN.from_pretrained(tokenizer).eval()
    return lvm_encoder(LVM.from_pretrained(model).eval(), vq), vq.config.resolution


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved AIM or LVM directory, or an AIM preset name (random init)")
    parser.add_argument("--tokenizer", help="VQGAN directory, for an LVM")
    parser.add_argument("--vlm-encoder", help="a vlm.encoders spec as JSON, instead of --model")
    parser.add_argument("--data", required=True, choices=DATASETS)
    parser.add_argument("--size", type=int, help="image size (default: what the model takes)")
    parser.add_argument("--count", type=int, default=2400, help="train images of the procedural sets (test: a quarter)")
    parser.add_argument("--layers", help="AIM blocks to average, e.g. 2,3 (default: the final-norm output)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.model or args.vlm_encoder):
        parser.error("pass --model or --vlm-encoder")
    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    encoder, model_size = load_encoder(args.model, args.tokenizer, args.vlm_encoder, layers)
    size = args.size or model_size
    if size is None:
        parser.error("--size is needed with --vlm-encoder")
    torch.manual_seed(args.seed)
    train_images, train_labels, classes = labelled(args.data, "train", size, args.count)
    test_images, test_labels, _ = labelled(args.data, "test", size, args.count // 4)
    top1 = probe_top1(encoder, (train_images, train_labels), (test_images, test_labels), classes,
                      epochs=args.epochs, seed=args.seed)  # fmt: skip
    print(f"{args.data}: attentive probe top-1 {top1:.4f} ({len(test_labels)} test images, {classes} classes, chance {1 / classes:.3f})")
    result = {"model": args.model or args.vlm_encoder, "data": args.data, "top1": top1, "classes": classes}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
