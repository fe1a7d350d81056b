"""The demo's AIM stage: train `aim_demo` through the Lightning CLI (configs/aim/demo.yaml) on the same
embedded photos and procedural images as the tokenizer, then compare frozen features with one attentive
probe (lvm/probe.py) on held-out labelled images (two shapes: the same colour or not): AIM's trunk, the
demo LVM's hidden states over the image's tokens, and the same AIM with random weights (what the probe
gets from the architecture alone).

    metrics["aim"] = {"probe_top1": {"aim": a, "lvm": l, "random_init": r}, "count": test images,
                      "labelled": the probe's training images, "data": the labelled set, "chance": 1 / classes}
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from data.labelled import labelled
from lvm.aim import AIM, AIMConfig
from lvm.probe import aim_encoder, lvm_encoder, probe_top1

CONFIG = "configs/aim/demo.yaml"
# Two shapes, the same colour or not (chance 1/2): a relation across patches. On one-shape classes
# ("shapes") the pixels of single patches suffice, and a random trunk, which passes them on almost
# unchanged, probes as well as AIM does (README, "AIM"); what the two objectives learn differs on relations.
PROBE_DATA = "same_color"
# 128 labelled images per class, a low-label probe: there pre-trained features matter most, and the
# three probes fit in the stage's time. 100 epochs of 4 batches: the probe has converged by then.
FULL = dict(train_images=256, test_images=600, epochs=100, aim_args=[])
SMOKE = dict(train_images=24, test_images=12, epochs=2,
             aim_args=["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--model.warmup_steps", "1",
                       "--data.batch_size", "4", "--data.train_samples_per_epoch", "12", "--data.val_procedural", "2"])  # fmt: skip


def aim_stage(out: Path, vq, lvm, train: Callable[[str, Path, list[str]], Path], smoke: bool = False) -> dict:
    """Train aim_demo with `train(config, run_dir, extra_args) -> export dir` (scripts.demo.train_with_cli)
    and probe it, the LVM `lvm` (reading images through the VQGAN `vq`) and a random-init aim_demo."""
    settings = SMOKE if smoke else FULL
    aim = AIM.from_pretrained(train(CONFIG, out / "aim", settings["aim_args"])).eval()
    torch.manual_seed(0)
    untrained = AIM(AIMConfig.from_name("aim_demo")).eval()
    size = aim.config.image_size
    if vq.config.resolution != size:
        raise ValueError(f"the demo tokenizer reads {vq.config.resolution}px images, aim_demo {size}px: probe data must fit both")
    train_images, train_labels, classes = labelled(PROBE_DATA, "train", size, settings["train_images"])
    test_images, test_labels, _ = labelled(PROBE_DATA, "test", size, settings["test_images"])
    encoders = {"aim": aim_encoder(aim), "lvm": lvm_encoder(lvm.eval(), vq.eval()), "random_init": aim_encoder(untrained)}
    top1 = {
        name: probe_top1(encoder, (train_images, train_labels), (test_images, test_labels), classes, epochs=settings["epochs"])
        for name, encoder in encoders.items()
    }
    return {"probe_top1": top1, "count": len(test_labels), "data": PROBE_DATA, "chance": 1 / classes,
            "labelled": len(train_labels)}


def print_aim(metrics: dict) -> None:
    top1 = metrics["probe_top1"]
    print(f"\n{'attentive probe, ' + metrics['data']:<26}" + "".join(f"{k:>12}" for k in top1))
    print(f"{'top-1 (' + str(metrics['count']) + ' held-out)':<26}" + "".join(f"{v:>12.4f}" for v in top1.values()))
