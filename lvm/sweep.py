"""The sweep runner: one training through `train.py` per model size x number of steps, and its table.

    python -m lvm.sweep --out runs/scaling --sizes 64x2,128x2 --steps 20,40 [--jobs 2] [-- train.py args]
    python -m lvm.sweep --out runs/scaling --isoflop 2e10,8e10 --isoflop-sizes 8x1,16x1,32x1 --tokens-per-step 1032 [-- ..]

The first trains every size for every number of steps; the second is Chinchilla's isoFLOP design (approach 2):
for each compute budget C, each size for the steps that spend C = 6 N D (isoflop_runs). Both can be given at once.

`--config configs/aim/demo.yaml` sweeps AIM (next-patch regression on images) instead: its tokens are
patches, and its runs give the same table.

The same command runs on a GPU cluster with a GPU config (`--config configs/lvm/vqlm_100m.yaml` and the
data paths after `--`): each run is a train.py fit with that config's devices, nodes and precision, and the
table (sweep.csv, COLUMNS) is the same. Finished runs are skipped, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

from data.shards import MANIFEST_FILE
from lvm.aim import AIMConfig
from lvm.config import LVMConfig
from lvm.scaling import ROOT, flops_per_token, num_params

HEAD_DIM = 32  # sweep sizes keep the head width and grow the head count, as the LLaMA family does
TABLE = "sweep.csv"
COLUMNS = ("run", "hidden_size", "num_layers", "steps", "params", "non_embedding_params", "tokens", "flops", "train_loss", "val_loss")


def size_overrides(hidden: int, layers: int) -> dict:
    """LVMConfig fields of a sweep size: heads of HEAD_DIM, SwiGLU width 8/3 hidden rounded up to a
    multiple of 16 (the rule of the vqlm_demo / vqlm_tiny presets)."""
    heads = max(1, hidden // HEAD_DIM)
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                intermediate_size=16 * -(-8 * hidden // (3 * 16)))  # fmt: skip


def sized_model_overrides(base: dict, hidden: int, layers: int) -> dict:
    """The model_overrides of a train.py config (a loaded YAML dict) for one sweep size."""
    sized = size_overrides(hidden, layers)
    if is_aim(base):
        del sized["num_kv_heads"]  # AIM attends with as many key/value heads as query heads
    return {**(base["model"]["init_args"].get("model_overrides") or {}), **sized}


def isoflop_runs(config: str | Path, sizes: Sequence[tuple[int, int]], budgets: Sequence[float], tokens_per_step: int,
                 min_steps: int = 50, max_steps: int | None = None) -> list[tuple[tuple[int, int], int]]:  # fmt: skip
    """Chinchilla's isoFLOP design: ((hidden, layers), steps) for each budget C and size, the steps that spend
    C = 6 N D with D = steps x tokens_per_step (rounded), N the size's non-embedding parameters under the model of
    `config` (a train.py config). A size whose run would be shorter than `min_steps` is left out of that budget
    (its warmup and the first steps' fast fall would be most of its loss), and so is one longer than `max_steps`
    (on a small data set it would see each example too many times)."""
    base = yaml.safe_load((ROOT / config).read_text())
    runs = []
    for budget, (hidden, layers) in itertools.product(budgets, sizes):
        sized = {"model": {**base["model"], "init_args": {**base["model"]["init_args"],
                                                            "model_overrides": sized_model_overrides(base, hidden, layers)}}}  # fmt: skip
        steps = round(budget / (6 * num_params(model_config(sized), non_embedding=True) * tokens_per_step))
        if min_steps <= steps <= (max_steps or steps):
            runs.append(((hidden, layers), steps))
    return runs


def _run_config(run_dir: Path) -> dict:
    """The full config of a run, as LightningCLI saved it in the run's log directory."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def is_aim(config: dict) -> bool:
    """Whether a run config trains AIM (lvm.aim_module.AIMModule) rather than the LVM."""
    return config["model"]["class_path"].endswith("AIMModule")


def model_config(config: dict) -> LVMConfig | AIMConfig:
    init = config["model"]["init_args"]
    return (AIMConfig if is_aim(config) else LVMConfig).from_name(init["model"], **(init.get("model_overrides") or {}))


def seq_len(config: dict) -> int:
    """Tokens per sequence: the data's row length, or AIM's patches per image."""
    return model_config(config).num_patches if is_aim(config) else config["data"]["init_args"]["seq_len"]


def tokens_per_step(config: dict) -> int:
    """Tokens in one optimiser step (padding included, as in the throughput logs) of a saved run config."""
    data, trainer = config["data"]["init_args"], config["trainer"]
    ranks = int(trainer["devices"]) * int(trainer["num_nodes"])
    return data["batch_size"] * seq_len(config) * trainer["accumulate_grad_batches"] * ranks


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def loss_curve(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(tokens seen, training loss) at every logged step of a run."""
    run_dir = Path(run_dir)
    rows = [r for r in _metrics(run_dir) if r.get("train/loss")]
    steps = np.array([int(r["step"]) + 1 for r in rows])  # the loss of step i is logged after i + 1 updates
    return steps * tokens_per_step(_run_config(run_dir)), np.array([float(r["train/loss"]) for r in rows])


def run_record(run_dir: str | Path) -> dict:
    """One table row from a finished run's logs: its config.yaml and metrics.csv."""
    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    steps = config["trainer"]["max_steps"]
    model = model_config(config)
    metrics = _metrics(run_dir)
    last = {key: float(r[key]) for r in metrics for key in ("train/loss", "val/loss") if r.get(key)}  # latest wins
    tokens = steps * tokens_per_step(config)
    return dict(
        run=run_dir.name, hidden_size=model.hidden_size, num_layers=model.num_layers, steps=steps,
        params=num_params(model), non_embedding_params=num_params(model, non_embedding=True), tokens=tokens,
        flops=flops_per_token(model, seq_len(config)) * tokens,
        train_loss=last.get("train/loss"), val_loss=last.get("val/loss"),
    )  # fmt: skip


def demo_shards(directory: str | Path, train: int = 32, val: int = 8, images_per_sentence: int = 4) -> tuple[str, str]:
    """Train and held-out shard sets of procedural analogies under `directory`, tokenized by a random-init
    `vqgan_demo` (its codes need no training to give a learnable next-token task), unless already there.
    Returns their paths for data.init_args.train / .val."""
    from data.sources import sentences_from_spec
    from data.tokenize import tokenize_to_shards
    from tokenizer import VQGAN

    torch.manual_seed(0)  # the tokenizer's random weights, so that re-created shards are the same
    vq = VQGAN.from_name("vqgan_demo").eval()
    paths = []
    for split, count in (("train", train), ("heldout", val)):
        path = Path(directory) / split
        paths.append(str(path))
        manifest = path / MANIFEST_FILE
        if manifest.exists() and json.loads(manifest.read_text())["samples"] == count:
            continue  # made before: drawing the procedural images again alone would take minutes at full size
        sentences = sentences_from_spec("procedural", split=split, image_size=vq.config.resolution, count=count,
                                        images_per_sentence=images_per_sentence)  # fmt: skip
        with torch.no_grad():
            tokenize_to_shards(sentences, vq, path, samples_per_shard=max(1, count // 4), progress=False)
    return paths[0], paths[1]


def run_one(run_dir: Path, base_config: str, hidden: int, layers: int, steps: int, log_every: int,
            train_args: Sequence[str], threads: int | None = None) -> None:  # fmt: skip
    """Train one size for `steps` through train.py: the base config, then an overlay that sets the size,
    the length (the cosine schedule spans the whole run), one validation at the end and a CSV logger
    writing into run_dir, then `train_args` (they win). `threads`: OMP_NUM_THREADS of the run."""
    if run_dir.exists():  # an interrupted run: start it over (partial logs would mix with the new ones)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    base = yaml.safe_load(Path(base_config).read_text())
    overrides = sized_model_overrides(base, hidden, layers)
    overlay = {
        "trainer": {
            "max_steps": steps, "val_check_interval": steps, "check_val_every_n_epoch": None,
            "log_every_n_steps": log_every, "default_root_dir": str(run_dir), "enable_checkpointing": False,
            "callbacks": [],
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}},
        },
        "model": {"init_args": {"model_overrides": overrides, "export_dir": None}},
    }  # fmt: skip
    (run_dir / "sweep.yaml").write_text(yaml.safe_dump(overlay))
    command = [sys.executable, "train.py", "fit", "--config", base_config, "--config", str(run_dir / "sweep.yaml"), *train_args]
    with open(run_dir / "train.log", "w") as log:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"run {run_dir.name} failed (exit {code}); {run_dir / 'train.log'} ends:\n{tail}")
    (run_dir / "finished").touch()


def sweep(out: str | Path, sizes: Sequence[tuple[int, int]], steps: Sequence[int], config: str = "configs/lvm/demo.yaml",
          log_every: int = 1, train_args: Sequence[str] = (), jobs: int = 1, train: bool = True,
          runs: Sequence[tuple[tuple[int, int], int]] = (), progress=print) -> list[dict]:  # fmt: skip
    """Train every (hidden, layers) size for every number of steps, then the ((hidden, layers), steps) `runs`
    (isoflop_runs) not among them, under out/runs/, skipping runs that finished before, and write out/sweep.csv
    with one row per run (COLUMNS, in that order). Returns the rows.
    Runs train cheapest first (size x steps), `jobs` at a time: a sweep stopped early still has every size's
    short runs. `train=False` trains nothing and tabulates the finished runs only (a sweep still running, or
    stopped: fit what is there). A run is named by its size and steps only: give each setting of `config` / `train_args` its own `out`."""
    out = Path(out).resolve()
    config = str(ROOT / config)  # train.py runs in the repository: relative paths are relative to it
    grid = list(itertools.product(sizes, steps))
    grid += [key for key in dict.fromkeys(runs) if key not in grid]  # an isoFLOP run the grid has is trained once
    dirs = {key: out / "runs" / f"h{key[0][0]}-l{key[0][1]}-s{key[1]}" for key in grid}
    todo = [key for key in grid if not (dirs[key] / "finished").exists()]
    for key in grid:
        if key not in todo:
            progress(f"{dirs[key].name}: finished before, skipped")
    todo.sort(key=lambda key: key[0][0] ** 2 * key[0][1] * key[1])  # hidden^2 x layers x steps: the blocks' FLOPs
    if not train:
        grid, todo = [key for key in grid if key not in todo], []
    # Runs side by side each get their share of the cores (torch would start one thread per core in each).
    threads = None if jobs == 1 or "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // jobs)

    def train_one(key):
        progress(f"{dirs[key].name}: training")
        run_one(dirs[key], config, *key[0], key[1], log_every, train_args, threads=threads)

    with ThreadPoolExecutor(jobs) as pool:  # threads only wait on train.py subprocesses
        for _ in pool.map(train_one, todo):  # re-raises the first failure
            pass
    rows = [run_record(dirs[key]) for key in grid]
    write_table(rows, out / TABLE)
    return rows


def write_table(rows: Sequence[dict], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_table(path: str | Path) -> list[dict]:
    """The rows of a sweep.csv, typed as run_record makes them (a run without a loss has None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != set(COLUMNS):
        raise ValueError(f"{path} is not a sweep table: its columns are {list(rows[0])}, expected {list(COLUMNS)}")
    floats = ("train_loss", "val_loss")
    return [{key: r[key] if key == "run" else (float(r[key]) if r[key] else None) if key in floats else int(r[key])
             for key in COLUMNS} for r in rows]  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in size.split("x")) for size in text.split(",")] if text else []


def main(argv: Sequence[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m lvm.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, help="sweep directory: runs/ and sweep.csv")
    parser.add_argument("--sizes", default="", help="HIDDENxLAYERS,.. e.g. 64x2,128x2: each trained for each --steps")
    parser.add_argument("--steps", default=[], type=_ints, help="optimiser steps per run, e.g. 20,40")
    parser.add_argument("--isoflop", default=[], type=_floats, help="compute budgets C = 6ND, e.g. 2e10,8e10: "
                        "each --isoflop-sizes size trained for the steps that spend C")
    parser.add_argument("--isoflop-sizes", default="", help="HIDDENxLAYERS,.. of the --isoflop runs")
    parser.add_argument("--tokens-per-step", type=int, help="tokens per optimiser step of the --isoflop runs "
                        "(batch_size x seq_len x accumulation x ranks)")
    parser.add_argument("--min-steps", type=int, default=50, help="leave out --isoflop runs shorter than this")
    parser.add_argument("--max-steps", type=int, help="leave out --isoflop runs longer than this")
    parser.add_argument("--config", default="configs/lvm/demo.yaml", help="train.py config (model preset, data)")
    parser.add_argument("--log-every", type=int, default=1, help="log the training loss every N steps")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (CPU: one per core, OMP_NUM_THREADS=1)")
    parser.add_argument("--no-train", dest="train", action="store_false", help="only tabulate the runs finished so far")
    args = parser.parse_args(argv)
    if not (args.sizes and args.steps) and not (args.isoflop and args.isoflop_sizes):
        parser.error("nothing to train: give --sizes and --steps, or --isoflop and --isoflop-sizes (or both)")
    if args.isoflop and not args.tokens_per_step:
        parser.error("--isoflop needs --tokens-per-step (batch_size x seq_len x accumulation x ranks of the runs)")
    runs = isoflop_runs(args.config, _sizes(args.isoflop_sizes), args.isoflop, args.tokens_per_step, args.min_steps,
                        args.max_steps) if args.isoflop else []  # fmt: skip
    rows = sweep(args.out, _sizes(args.sizes), args.steps, args.config, args.log_every, train_args, args.jobs,
                 args.train, runs)  # fmt: skip
    print(f"{len(rows)} runs -> {Path(args.out) / TABLE}")
    return rows


if __name__ == "__main__":
    main()
