"""Fault drill: kill -9 LVM training at random moments (in a step, in validation, right after a
checkpoint, inside a checkpoint write), send preemption signals, inject non-finite gradients, take
the disk away, and kill `python -m data.tokenize`; then check that every resumed run ends with the
final weights (within 1e-6, fp32 CPU) and the per-step losses of an uninterrupted run.

    python -m scripts.fault_drill --kills 20 --workers 0,2 --out runs/fault_drill

Prints a table (fault / injected / survived / mismatches / lost checkpoints) and, last, one JSON line.
Training runs through `train.py` and `configs/lvm/demo.yaml` with a tiny model on tiny shards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CODES = 64  # vqgan_tiny's codebook
KILL_KINDS = ("step", "validation", "checkpoint", "temp file")


class DrillRecorder(L.Callback):
    """Appends each step's loss and each validation start to a JSON-lines file (the drill's view into
    the run); optionally makes the gradients of chosen optimiser steps NaN (a bad batch)."""

    def __init__(self, path: str, nan_steps: list[int] | None = None):
        self.path, self.nan_steps = Path(path), set(nan_steps or [])

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step + 1 in self.nan_steps:  # the optimiser step this backward feeds
            next(pl_module.parameters()).grad.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write({"step": trainer.global_step, "loss": float(outputs["loss"])})

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write({"event": "validation", "step": trainer.global_step})


# -- set-up ---------------------------------------------------------------------------------------------
def make_shards(out: Path) -> Path:
    """Procedural analogy sentences tokenized by a random-init vqgan_tiny: 2 images (514 tokens) each."""
    from data.sources import sentences_from_spec
    from data.tokenize import tokenize_to_shards
    from tokenizer import VQGAN

    if (out / "val" / "manifest.json").exists():
        return out
    torch.manual_seed(0)
    vq = VQGAN.from_name("vqgan_tiny").eval()
    for split, count in (("train", 48), ("val", 4)):
        sentences = sentences_from_spec("procedural", split=split, image_size=32, count=count, images_per_sentence=2)
        tokenize_to_shards(sentences, vq, out / split, samples_per_shard=8, progress=False)
    return out


def write_config(run: Path, shards: Path, steps: int, workers: int, nan_steps=(), max_skipped: int = 10) -> Path:
    """An overlay on configs/lvm/demo.yaml for a run in `run`: vqlm_tiny, a checkpoint every 2 steps,
    validation three times per run, and the drill's recorder among the callbacks."""
    callbacks = [
        {"class_path": "lvm.faults.FaultTolerance", "init_args": {"max_skipped_steps": max_skipped}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "every_n_train_steps": 2}},
        {"class_path": "scripts.fault_drill.DrillRecorder",
         "init_args": {"path": str(run / "record.jsonl"), "nan_steps": list(nan_steps)}},
    ]  # fmt: skip
    overlay = {
        "trainer": {
            "logger": False, "max_steps": steps, "val_check_interval": max(2, steps // 3), "limit_val_batches": 2,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "default_root_dir": str(run), "callbacks": callbacks,
        },
        "model": {"init_args": {
            "model": "vqlm_tiny", "model_overrides": {"codebook_size": CODES, "vocab_size": CODES + 100},
            "warmup_steps": 3, "learning_rate": 3e-3, "export_dir": str(run / "hf"),
        }},
        "data": {"init_args": {
            "train": str(shards / "train"), "val": str(shards / "val"), "seq_len": 512, "batch_size": 2,
            "num_workers": workers, "shuffle_buffer": 8,
        }},
    }  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    (run / "drill.yaml").write_text(yaml.safe_dump(overlay))
    return run / "drill.yaml"


def train(run: Path, resume: bool = False) -> subprocess.Popen:
    """Start `train.py fit` on configs/lvm/demo.yaml with the run's overlay, in its own process group."""
    command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/lvm/demo.yaml"),
               "--config", str(run / "drill.yaml"), *(["--ckpt_path", "last"] if resume else [])]  # fmt: skip
    return start(command, run / "train.log")


def start(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    with log.open("a") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process and its DataLoader workers at once, as when a node dies."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -- what the run wrote -----------------------------------------------------------------------------------
def records(run: Path) -> list[dict]:
    path = run / "record.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]  # a kill may cut the last line


def step_losses(run: Path) -> dict[int, float]:
    """Loss per step; steps redone after a resume overwrite the killed process's values."""
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def checkpoint_ok(path: Path) -> bool:
    from lvm.checkpoints import load_weights_only

    try:
        return "state_dict" in load_weights_only(path)
    except (OSError, ValueError):
        return False


def compare(reference: Path, run: Path) -> list[str]:
    """Mismatches of `run` against `reference`: final weights beyond 1e-6, or any step's loss."""
    from lvm.checkpoints import read_state_dict

    if not (run / "hf").exists():
        return ["no final export"]
    ref, got = read_state_dict(reference / "hf"), read_state_dict(run / "hf")
    worst = max((ref[k].float() - got[k].float()).abs().max().item() for k in ref)
    problems = [f"weights differ by {worst:.2e}"] if worst > 1e-6 else []
    ref_losses, got_losses = step_losses(reference), step_losses(run)
    bad = [s for s in ref_losses if not math.isclose(ref_losses[s], got_losses.get(s, math.nan), abs_tol=1e-6)]
    return problems + ([f"losses differ at steps {bad[:5]}"] if bad else [])


# -- faults -----------------------------------------------------------------------------------------------
def wait_for(proc: subprocess.Popen, kind: str, run: Path, rng: random.Random, timeout: float = 900) -> bool:
    """Wait until the moment `kind` comes (True), or the process ends first (False)."""
    checkpoints = run / "checkpoints"
    last = checkpoints / "last.ckpt"
    mtime = last.stat().st_mtime_ns if last.exists() else None
    steps_seen = len(records(run))
    target = rng.randint(1, 4)  # for "step": this many new steps, then kill inside the next one
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if kind == "step" and len(records(run)) - steps_seen >= target:
            time.sleep(rng.uniform(0, 0.3))
            return True
        if kind == "validation" and any(r.get("event") == "validation" for r in records(run)[steps_seen:]):
            return True
        if kind == "checkpoint" and last.exists() and last.stat().st_mtime_ns != mtime:
            time.sleep(rng.uniform(0, 0.2))
            return True
        if kind == "temp file" and checkpoints.exists() and any(p.name.endswith(".tmp") for p in checkpoints.iterdir()):
            return True
        time.sleep(0.002)
    return False


def kill_run(run: Path, kinds: list[str], rng: random.Random) -> dict:
    """Train to the end, SIGKILLed once at each moment of `kinds` (resuming with --ckpt_path last after each)."""
    injected, lost = Counter(), 0
    pending = list(kinds)
    last = run / "checkpoints" / "last.ckpt"
    while True:
        proc = train(run, resume=last.exists())
        if pending and wait_for(proc, pending[0], run, rng):
            had = last.exists()
            kill(proc)
            injected[pending.pop(0)] += 1
            lost += had and not checkpoint_ok(last)
            continue
        if proc.wait() != 0:
            raise RuntimeError(f"training failed: see {run / 'train.log'}")
        return {"injected": injected, "lost": lost}  # moments the run no longer reached are not counted


def signal_run(run: Path, signum: int, rng: random.Random) -> bool:
    """Send `signum` mid-run: the process must exit 0 having saved last.ckpt at its last step; then resume."""
    from lvm.checkpoints import load_weights_only

    proc = train(run)
    wait_for(proc, "step", run, rng)
    proc.send_signal(signum)
    saved = proc.wait() == 0 and checkpoint_ok(run / "checkpoints" / "last.ckpt")
    saved = saved and load_weights_only(run / "checkpoints" / "last.ckpt")["global_step"] == max(step_losses(run))
    return saved and train(run, resume=True).wait() == 0


def nan_run(run: Path) -> bool:
    """NaN gradients at steps 3 and 5 with max_skipped_steps=1: the second stops training with an error
    naming that step; last.ckpt (step 4) stays loadable."""
    status = train(run).wait()
    log = (run / "train.log").read_text()
    return status != 0 and "global step 4 (epoch 0, batch 4)" in log and checkpoint_ok(run / "checkpoints" / "last.ckpt")


def tokenize_run(out: Path, rng: random.Random, kills: int) -> tuple[int, list[str]]:
    """Kill `python -m data.tokenize` `kills` times as shards appear, re-run it to the end, and check
    that every sentence is in exactly one shard."""
    from data.datamodule import ShardStats
    from data.shards import list_shards, read_shard

    command = [sys.executable, "-m", "data.tokenize", "--source", "procedural", "--count", "40",
               "--images-per-sentence", "2", "--image-size", "32", "--tokenizer", "vqgan_tiny",
               "--samples-per-shard", "4", "--batch-size", "4", "--out", str(out)]  # fmt: skip
    injected = 0
    while True:
        proc = start(command, out.parent / "tokenize.log")
        if injected < kills:
            seen = len(list(out.glob("*.tar"))) if out.exists() else 0
            while proc.poll() is None and (len(list(out.glob("*.tar"))) if out.exists() else 0) <= seen:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.5))
            if proc.poll() is None:
                kill(proc)
                injected += 1
                continue
        if proc.wait() != 0:
            raise RuntimeError(f"tokenize failed: see {out.parent / 'tokenize.log'}")
        break
    keys = Counter(s.key for shard in list_shards(out) for s in read_shard(shard, ShardStats()))
    expected = {f"shard-{i:09d}" for i in range(40)}
    problems = [f"missing {sorted(expected - set(keys))[:3]}"] if expected - set(keys) else []
    problems += [f"twice {[k for k, n in keys.items() if n > 1][:3]}"] if any(n > 1 for n in keys.values()) else []
    return injected, problems


# -- the drill ------------------------------------------------------------------------------------------
def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def drill(out: Path, kills: int, workers: list[int], steps: int, seed: int, extra_faults: bool = True) -> dict:
    rng = random.Random(seed)
    shards = make_shards(out / "shards")
    rows = []  # (fault, injected, survived, mismatches, lost checkpoints)
    plans = {w: [] for w in workers}
    for i in range(kills):  # every kind of moment with every worker count first, then at random
        first_round = i < len(KILL_KINDS) * len(workers)
        plans[workers[i % len(workers)]].append(KILL_KINDS[i // len(workers) % len(KILL_KINDS)] if first_round else rng.choice(KILL_KINDS))
    references = {}
    for w in workers:
        references[w] = reference = out / f"reference-w{w}"
        if not (reference / "hf").exists():
            write_config(fresh(reference), shards, steps, w)
            if train(reference).wait() != 0:
                raise RuntimeError(f"the uninterrupted run failed: see {reference / 'train.log'}")
    for w, kinds in plans.items():
        per_run = max(1, math.ceil(len(kinds) / max(1, steps // 6)))  # a run's kills must fit in its steps
        for r in range(per_run):
            run = fresh(out / f"killed-w{w}-{r}")
            write_config(run, shards, steps, w)
            result = kill_run(run, kinds[r::per_run], rng)
            problems = compare(references[w], run)
            for kind, n in result["injected"].items():
                rows.append((f"SIGKILL in {kind}, {w} workers", n, 0 if problems else n, len(problems), result["lost"]))
            if problems:
                print(f"{run}: {problems}", file=sys.stderr)
    if extra_faults:
        w = workers[0]
        for name in ("SIGTERM", "SIGUSR1"):
            run = fresh(out / f"signal-{name}")
            write_config(run, shards, steps, w)
            ok = signal_run(run, getattr(signal, name), rng)
            problems = compare(references[w], run)
            rows.append((f"{name}: save, exit 0, resume", 1, int(ok and not problems), len(problems), 0))
        run = fresh(out / "nan")
        write_config(run, shards, steps, w, nan_steps=[3, 5], max_skipped=1)
        ok = nan_run(run)
        rows.append(("NaN gradients past the limit", 1, int(ok), 0, int(not checkpoint_ok(run / "checkpoints/last.ckpt"))))
        n, problems = tokenize_run(fresh(out / "tokenize") / "shards", rng, kills=2)
        rows.append(("SIGKILL in data.tokenize", n, 0 if problems else n, len(problems), 0))
    return summarize(rows)


def summarize(rows: list[tuple]) -> dict:
    merged: dict[str, list[int]] = {}
    for fault, *numbers in rows:
        merged[fault] = [a + b for a, b in zip(merged.get(fault, [0, 0, 0, 0]), numbers, strict=True)]
    print(f"{'fault':<40} {'injected':>8} {'survived':>8} {'mismatches':>10} {'lost ckpts':>10}")
    for fault, numbers in merged.items():
        print(f"{fault:<40} " + " ".join(f"{n:>{w}}" for n, w in zip(numbers, (8, 8, 10, 10), strict=True)))
    totals = [sum(numbers[i] for numbers in merged.values()) for i in range(4)]
    kills = sum(n[0] for f, n in merged.items() if f.startswith("SIGKILL in") and "tokenize" not in f)
    return {"faults": dict(zip(("injected", "survived", "mismatches", "lost_checkpoints"), totals, strict=True)),
            "training_kills": kills, "rows": merged}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of LVM training, over all worker counts")
    parser.add_argument("--workers", default="0,2", help="dataloader worker counts to drill, comma-separated")
    parser.add_argument("--steps", type=int, default=24, help="optimiser steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-extra", action="store_true", help="kills only: no signals, NaNs or tokenize kills")
    parser.add_argument("--out", default="runs/fault_drill")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    result = drill(Path(args.out).resolve(), args.kills, workers, args.steps, args.seed, not args.no_extra)
    print(json.dumps(result["faults"] | {"training_kills": result["training_kills"]}))
    return result


if __name__ == "__main__":
    main()
