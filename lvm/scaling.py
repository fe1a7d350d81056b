"""Scaling-law tools: model sizes and FLOPs, power-law fits, and a sweep runner over `train.py`.

    sizes    num_params / flops_per_token of any LVMConfig (the model's own counts, on the meta device)
    fits     fit_compute_law    L(C) = E + a C^-b                       (loss vs training compute)
             fit_chinchilla     L(N, D) = E + A / N^alpha + B / D^beta  (Chinchilla's approach 3)
             isoflop_minima     the loss-minimising N per compute budget (Chinchilla's approach 2)
    sweep    python -m lvm.scaling sweep --out runs/scaling --sizes 64x2,128x2 --steps 20,40 [-- train.py args]

Both laws are fitted the way Hoffmann et al. (2022) and Epoch AI's replication (Besiroglu et al. 2024)
do: in log-sum-exp form, log L = LSE(e, a_1 - alpha_1 log x_1, ..), minimising the Huber loss
(delta 1e-3) of the log-loss residuals with L-BFGS from every point of a grid of initialisations.
N below is the non-embedding parameter count (lm_head included), the parameters that cost FLOPs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from lvm.config import LVMConfig
from lvm.model import LVM

ROOT = Path(__file__).resolve().parents[1]
CHINCHILLA_CSV = ROOT / "data" / "reference" / "chinchilla_svg_extracted_data.csv"
# Published fits of L(N, D) on those runs (data/reference/SOURCE.md).
EPOCH_AI_FIT = dict(E=1.817, A=482.0, B=2085.4, alpha=0.348, beta=0.366)  # the 240 runs load_chinchilla gives
HOFFMANN_FIT = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Chinchilla paper, on its full data


# -- sizes -------------------------------------------------------------------------------------------------
def _shape_only(config: LVMConfig) -> LVM:
    with torch.device("meta"):  # shapes without memory: counts of a 7B model cost nothing
        return LVM(config)


def num_params(config: LVMConfig, non_embedding: bool = False) -> int:
    return _shape_only(config).num_params(non_embedding=non_embedding)


def flops_per_token(config: LVMConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 N plus the attention products (LVM.flops_per_token)."""
    return _shape_only(config).flops_per_token(seq_len)


# -- fitting in log-sum-exp form -----------------------------------------------------------------------------
@dataclasses.dataclass
class Grid:
    """Initialisations for L-BFGS: every combination of e, and per term an intercept and a slope.
    The defaults are Epoch AI's grid (4500 starts for two terms); tests pass coarser ones."""

    e: Sequence[float] = tuple(np.arange(-1.0, 1.5, 0.5))
    intercept: Sequence[float] = tuple(np.arange(0.0, 30.0, 5.0))
    slope: Sequence[float] = tuple(np.arange(0.0, 2.5, 0.5))

    def starts(self, terms: int) -> np.ndarray:
        """[n_starts, 1 + 2 * terms] rows (e, intercepts.., slopes..)."""
        axes = [self.e] + [self.intercept] * terms + [self.slope] * terms
        return np.array(list(itertools.product(*axes)), dtype=float)


def _objective(theta: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float):
    """Huber loss of log L_hat - log L and its gradient; theta = (e, a_1..a_k, slope_1..slope_k),
    log L_hat = LSE(e, a_j - slope_j log x_j) over the k columns of log_x [n, k]."""
    k = log_x.shape[1]
    e, a, slope = theta[0], theta[1 : 1 + k], theta[1 + k :]
    terms = np.concatenate([np.full((len(log_x), 1), e), a - slope * log_x], axis=1)  # [n, 1 + k]
    shift = terms.max(axis=1, keepdims=True)  # a stable log-sum-exp, its exponentials reused below
    exp = np.exp(terms - shift)
    total = exp.sum(axis=1)
    residual = shift[:, 0] + np.log(total) - log_loss
    size = np.abs(residual)
    huber = np.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta)).sum()
    # d huber / d residual = residual clipped to +-delta; d log L_hat / d term_j = softmax weight of term j.
    weights = exp / total[:, None] * np.clip(residual, -delta, delta)[:, None]
    grad = np.concatenate([weights[:, :1].sum(0), weights[:, 1:].sum(0), -(weights[:, 1:] * log_x).sum(0)])
    return huber, grad


# The Huber objective is ~1e-3 and L-BFGS-B's default stopping tests are absolute below 1: with them a
# restart from a nearby optimum (the bootstrap's) stops almost at once, and the intervals come out ~100x narrow.
TOLERANCE = dict(ftol=1e-14, gtol=1e-12)


def _minimise(starts: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float) -> np.ndarray:
    """L-BFGS from every start; the parameters of the lowest objective."""
    best = None
    # One BLAS thread: L-BFGS-B's tiny matrix products are ~50x slower when a thread pool wakes for each.
    with threadpool_limits(1):
        for start in starts:
            result = minimize(_objective, start, args=(log_x, log_loss, delta), jac=True, method="L-BFGS-B", options=TOLERANCE)
            if best is None or result.fun < best.fun:
                best = result
    return best.x


def _fit(inputs: Sequence, loss, names: Sequence[str], grid: Grid | None, delta: float, bootstrap: int,
         level: float, seed: int) -> dict:  # fmt: skip
    """Fit log L = LSE(e, a_j - slope_j log inputs_j) over the grid; returns {name: value} for `names`
    in the order (E, the A_j, the slopes) with E = exp(e), A_j = exp(a_j), plus "intervals": the
    bootstrap percentile interval of each (none if bootstrap=0). Each resample restarts only from the
    full-data optimum: the grid would multiply the cost by its size, and the resampled optimum lies near."""
    log_x = np.log(np.stack([np.asarray(x, dtype=float) for x in inputs], axis=1))  # [n, k]
    log_loss = np.log(np.asarray(loss, dtype=float))
    theta = _minimise((grid or Grid()).starts(len(inputs)), log_x, log_loss, delta)
    draws = []
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        rows = rng.integers(0, len(log_loss), len(log_loss))
        draws.append(_minimise(theta[None], log_x[rows], log_loss[rows], delta))

    def natural(values: np.ndarray) -> np.ndarray:  # increasing, so it also maps interval ends to ends
        return np.concatenate([np.exp(values[..., : 1 + len(inputs)]), values[..., 1 + len(inputs) :]], axis=-1)

    fitted = dict(zip(names, natural(theta).tolist(), strict=True))
    if draws:
        tail = 100 * (1 - level) / 2
        low, high = natural(np.percentile(np.array(draws), [tail, 100 - tail], axis=0))
        fitted["intervals"] = {n: (float(lo), float(hi)) for n, lo, hi in zip(names, low, high, strict=True)}
    return fitted


@dataclasses.dataclass
class ComputeLaw:
    """L(C) = E + a * C^-b, with bootstrap intervals per parameter (empty without bootstrap)."""

    E: float
    a: float
    b: float
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def predict(self, compute):
        return self.E + self.a * np.asarray(compute, dtype=float) ** -self.b


def fit_compute_law(compute, loss, grid: Grid | None = None, delta: float = 1e-3, bootstrap: int = 0,
                    level: float = 0.95, seed: int = 0) -> ComputeLaw:  # fmt: skip
    """Fit L = E + a C^-b to (training FLOPs, final loss) pairs."""
    return ComputeLaw(**_fit([compute], loss, ("E", "a", "b"), grid, delta, bootstrap, level, seed))


@dataclasses.dataclass
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap intervals (empty without bootstrap)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def predict(self, params, tokens):
        return self.E + self.A / np.asarray(params, dtype=float) ** self.alpha + self.B / np.asarray(tokens, dtype=float) ** self.beta

    def compute_optimal(self, compute) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) minimising L for a budget C = 6 N D (Hoffmann et al. eq. 4):
        N = G (C/6)^(beta / (alpha + beta)), D = (C/6)^(alpha / (alpha + beta)) / G,
        G = (alpha A / (beta B))^(1 / (alpha + beta))."""
        total = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / total)
        budget = np.asarray(compute, dtype=float) / 6
        return g * budget ** (self.beta / total), budget ** (self.alpha / total) / g


def fit_chinchilla(params, tokens, loss, grid: Grid | None = None, delta: float = 1e-3, bootstrap: int = 0,
                   level: float = 0.95, seed: int = 0) -> ChinchillaLaw:  # fmt: skip
    """Chinchilla's approach 3 on runs of N parameters trained on D tokens to final loss L."""
    names = ("E", "A", "B", "alpha", "beta")
    return ChinchillaLaw(**_fit([params, tokens], loss, names, grid, delta, bootstrap, level, seed))


def isoflop_minima(params, compute, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chinchilla's approach 2: per compute budget (runs sharing a `compute` value), a parabola in
    log N through the losses, and its vertex. Returns (budgets, N_opt, L_opt) for the budgets with at
    least three sizes and an upward parabola (an isoFLOP profile with no minimum inside says nothing)."""
    params, compute, loss = (np.asarray(v, dtype=float) for v in (params, compute, loss))
    found = []
    for budget in np.unique(compute):
        at = compute == budget
        if at.sum() < 3:
            continue
        coefficients = np.polyfit(np.log(params[at]), loss[at], 2)
        if coefficients[0] <= 0:
            continue
        vertex = -coefficients[1] / (2 * coefficients[0])
        found.append((budget, np.exp(vertex), np.polyval(coefficients, vertex)))
    return tuple(np.array(column) for column in zip(*found, strict=True)) if found else (np.array([]),) * 3


def isoflop_points(params, compute, loss, budgets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs on a sizes x token-budgets grid -> points on isoFLOP slices: for each model size, its final
    losses interpolated (in log compute) at each budget its runs span. Feed the result to isoflop_minima."""
    params, compute, loss = (np.asarray(v, dtype=float) for v in (params, compute, loss))
    points = []
    for size in np.unique(params):
        order = np.argsort(compute[params == size])
        log_c, size_loss = np.log(compute[params == size][order]), loss[params == size][order]
        for budget in budgets:
            if log_c[0] <= np.log(budget) <= log_c[-1]:
                points.append((size, budget, np.interp(np.log(budget), log_c, size_loss)))
    return tuple(np.array(column) for column in zip(*points, strict=True)) if points else (np.array([]),) * 3


def load_chinchilla(path: str | Path = CHINCHILLA_CSV, drop_highest: int = 5) -> tuple[np.ndarray, ...]:
    """(N, D, loss) of the Chinchilla runs extracted by Epoch AI (data/reference/SOURCE.md), without
    the `drop_highest` highest-loss runs (Epoch AI's outliers); D = C / (6 N)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    params = np.array([float(r["Model Size"]) for r in rows])
    compute = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.sort(np.argsort(loss, kind="stable")[: len(loss) - drop_highest])
    return params[keep], compute[keep] / (6 * params[keep]), loss[keep]


# -- sweep runner --------------------------------------------------------------------------------------------
HEAD_DIM = 32  # sweep sizes keep the head width and grow the head count, as the LLaMA family does
TABLE = "sweep.csv"
COLUMNS = ("run", "hidden_size", "num_layers", "steps", "params", "non_embedding_params", "tokens", "flops", "train_loss", "val_loss")


def size_overrides(hidden: int, layers: int) -> dict:
    """LVMConfig fields of a sweep size: heads of HEAD_DIM, SwiGLU width 8/3 hidden rounded up to a
    multiple of 16 (the rule of the vqlm_demo / vqlm_tiny presets)."""
    heads = max(1, hidden // HEAD_DIM)
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                intermediate_size=16 * -(-8 * hidden // (3 * 16)))  # fmt: skip


def _run_config(run_dir: Path) -> dict:
    """The full config of a run, as LightningCLI saved it in the run's log directory."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def tokens_per_step(config: dict) -> int:
    """Tokens in one optimiser step (padding included, as in the throughput logs) of a saved run config."""
    data, trainer = config["data"]["init_args"], config["trainer"]
    ranks = int(trainer["devices"]) * int(trainer["num_nodes"])
    return data["batch_size"] * data["seq_len"] * trainer["accumulate_grad_batches"] * ranks


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
    init, steps = config["model"]["init_args"], config["trainer"]["max_steps"]
    model = LVMConfig.from_name(init["model"], **(init.get("model_overrides") or {}))
    metrics = _metrics(run_dir)
    last = {key: float(r[key]) for r in metrics for key in ("train/loss", "val/loss") if r.get(key)}  # latest wins
    tokens = steps * tokens_per_step(config)
    return dict(
        run=run_dir.name, hidden_size=model.hidden_size, num_layers=model.num_layers, steps=steps,
        params=num_params(model), non_embedding_params=num_params(model, non_embedding=True), tokens=tokens,
        flops=flops_per_token(model, config["data"]["init_args"]["seq_len"]) * tokens,
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
        sentences = sentences_from_spec("procedural", split=split, image_size=vq.config.resolution, count=count,
                                        images_per_sentence=images_per_sentence)  # fmt: skip
        with torch.no_grad():
            tokenize_to_shards(sentences, vq, path, samples_per_shard=max(1, count // 4), progress=False)
        paths.append(str(path))
    return paths[0], paths[1]


def run_one(run_dir: Path, base_config: str, hidden: int, layers: int, steps: int, log_every: int,
            train_args: Sequence[str]) -> None:  # fmt: skip
    """Train one size for `steps` through train.py: the base config, then an overlay that sets the size,
    the length (the cosine schedule spans the whole run), one validation at the end and a CSV logger
    writing into run_dir, then `train_args` (they win)."""
    if run_dir.exists():  # an interrupted run: start it over (partial logs would mix with the new ones)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    base = yaml.safe_load(Path(base_config).read_text())
    overrides = {**(base["model"]["init_args"].get("model_overrides") or {}), **size_overrides(hidden, layers)}
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
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"run {run_dir.name} failed (exit {code}); {run_dir / 'train.log'} ends:\n{tail}")
    (run_dir / "finished").touch()


def sweep(out: str | Path, sizes: Sequence[tuple[int, int]], steps: Sequence[int], config: str = "configs/lvm/demo.yaml",
          log_every: int = 1, train_args: Sequence[str] = (), progress=print) -> list[dict]:  # fmt: skip
    """Train every (hidden, layers) size for every number of steps under out/runs/, skipping runs that
    finished before, and write out/sweep.csv with one row per run (COLUMNS). Returns the rows.
    A run is named by its size and steps only: give each setting of `config` / `train_args` its own `out`."""
    out = Path(out).resolve()
    config = str(ROOT / config)  # train.py runs in the repository: relative paths are relative to it
    rows = []
    for (hidden, layers), n in itertools.product(sizes, steps):
        run_dir = out / "runs" / f"h{hidden}-l{layers}-s{n}"
        if (run_dir / "finished").exists():
            progress(f"{run_dir.name}: finished before, skipped")
        else:
            progress(f"{run_dir.name}: training")
            run_one(run_dir, config, hidden, layers, n, log_every, train_args)
        rows.append(run_record(run_dir))
    with open(out / TABLE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m lvm.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("sweep", help="train a grid of model sizes x steps; arguments after -- go to train.py")
    run.add_argument("--out", required=True, help="sweep directory: runs/ and sweep.csv")
    run.add_argument("--sizes", required=True, help="HIDDENxLAYERS,.. e.g. 64x2,128x2")
    run.add_argument("--steps", required=True, type=_ints, help="optimiser steps per run, e.g. 20,40")
    run.add_argument("--config", default="configs/lvm/demo.yaml", help="train.py config (model preset, data)")
    run.add_argument("--log-every", type=int, default=1, help="log the training loss every N steps")
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    rows = sweep(args.out, sizes, args.steps, args.config, args.log_every, train_args)
    print(f"{len(rows)} runs -> {Path(args.out) / TABLE}")
    return rows


if __name__ == "__main__":
    main()
