"""Scaling-law tools: model sizes and FLOPs and power-law fits (the runs come from lvm.sweep).

    sizes    num_params / flops_per_token of any LVMConfig (the model's own counts, on the meta device)
    fits     fit_compute_law    L(C) = E + a C^-b                       (the compute frontier, pareto_frontier)
             fit_chinchilla     L(N, D) = E + A / N^alpha + B / D^beta  (Chinchilla's approach 3)
             fit_isoflop        Chinchilla's approach 2: per isoFLOP budget (isoflop_slices) a parabola in log N
                                and its minimum (isoflop_minima), power laws N_opt(C) and D_opt(C) through them

Both laws are fitted the way Hoffmann et al. (2022) and Epoch AI's replication (Besiroglu et al. 2024)
do: in log-sum-exp form, log L = LSE(e, a_1 - alpha_1 log x_1, ..), minimising the Huber loss
(delta 1e-3) of the log-loss residuals with L-BFGS from every point of a grid of initialisations.
N below is the non-embedding parameter count (lm_head included), the parameters that cost FLOPs.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from lvm.aim import AIM, AIMConfig
from lvm.config import LVMConfig
from lvm.model import LVM

ROOT = Path(__file__).resolve().parents[1]
CHINCHILLA_CSV = ROOT / "data" / "reference" / "chinchilla_svg_extracted_data.csv"
# Published fits of L(N, D) on those runs (data/reference/SOURCE.md).
EPOCH_AI_FIT = dict(E=1.817, A=482.0, B=2085.4, alpha=0.348, beta=0.366)  # the 240 runs load_chinchilla gives
HOFFMANN_FIT = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Chinchilla paper, on its full data


# -- sizes -------------------------------------------------------------------------------------------------
def _shape_only(config: LVMConfig | AIMConfig) -> LVM | AIM:
    """The model of an LVMConfig (or an AIMConfig) on the meta device."""
    with torch.device("meta"):  # shapes without memory: counts of a 7B model cost nothing
        return AIM(config) if isinstance(config, AIMConfig) else LVM(config)


def num_params(config: LVMConfig | AIMConfig, non_embedding: bool = False) -> int:
    return _shape_only(config).num_params(non_embedding=non_embedding)


def flops_per_token(config: LVMConfig | AIMConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 N plus the attention products (LVM.flops_per_token; AIM's per patch)."""
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
    bootstrap percentile interval of each (none if bootstrap=0) and "draws": the resamples' fits
    [bootstrap, len(names)], for intervals of functions of several parameters. Each resample restarts only from the
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
        low, high = natural(np.array([percentile_interval(column, level) for column in np.array(draws).T]).T)
        fitted["intervals"] = {n: (float(lo), float(hi)) for n, lo, hi in zip(names, low, high, strict=True)}
        fitted["draws"] = natural(np.array(draws))
    return fitted


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(low), float(high)


@dataclasses.dataclass
class ComputeLaw:
    """L(C) = E + a * C^-b, with bootstrap intervals per parameter (empty without bootstrap)."""

    E: float
    a: float
    b: float
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    draws: np.ndarray | None = dataclasses.field(default=None, repr=False)

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
    draws: np.ndarray | None = dataclasses.field(default=None, repr=False)  # [bootstrap, 5]: E, A, B, alpha, beta

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

    def optimal_exponents(self, level: float = 0.95) -> dict[str, tuple[float, tuple[float, float] | None]]:
        """{"N": (a, interval), "D": (b, interval)}: N_opt ~ C^a, a = beta / (alpha + beta), and D_opt ~ C^b,
        b = alpha / (alpha + beta), with percentile intervals over the bootstrap fits (None without them)."""
        a, b = self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)
        if self.draws is None:
            return {"N": (a, None), "D": (b, None)}
        alpha, beta = self.draws[:, 3], self.draws[:, 4]
        return {"N": (a, percentile_interval(beta / (alpha + beta), level)),
                "D": (b, percentile_interval(alpha / (alpha + beta), level))}  # fmt: skip


def fit_chinchilla(params, tokens, loss, grid: Grid | None = None, delta: float = 1e-3, bootstrap: int = 0,
                   level: float = 0.95, seed: int = 0) -> ChinchillaLaw:  # fmt: skip
    """Chinchilla's approach 3 on runs of N parameters trained on D tokens to final loss L."""
    names = ("E", "A", "B", "alpha", "beta")
    return ChinchillaLaw(**_fit([params, tokens], loss, names, grid, delta, bootstrap, level, seed))


@dataclasses.dataclass
class PowerLaw:
    """y = coefficient * x^exponent, with a bootstrap percentile interval of the exponent (None without)."""

    exponent: float
    coefficient: float
    interval: tuple[float, float] | None = None

    def predict(self, x):
        return self.coefficient * np.asarray(x, dtype=float) ** self.exponent


def fit_power_law(x, y, bootstrap: int = 0, level: float = 0.95, seed: int = 0) -> PowerLaw:
    """Least squares of log y on log x (approach 2's N_opt(C), D_opt(C)); the interval resamples the points."""
    log_x, log_y = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    exponent, intercept = np.polyfit(log_x, log_y, 1)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        rows = rng.integers(0, len(log_x), len(log_x))
        if np.ptp(log_x[rows]) > 0:  # a resample of one repeated point has no slope
            draws.append(np.polyfit(log_x[rows], log_y[rows], 1)[0])
    return PowerLaw(float(exponent), float(np.exp(intercept)), percentile_interval(draws, level) if draws else None)


def pareto_frontier(compute, loss) -> np.ndarray:
    """Indices, by increasing compute, of the runs with a lower loss than every run that cost less or the
    same: the compute frontier the law L(C) = E + a C^-b describes (runs above it are off-optimal sizes)."""
    compute, loss = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    order = np.lexsort((loss, compute))  # by compute, then loss
    best, keep = np.inf, []
    for index in order:
        if loss[index] < best:
            best = loss[index]
            keep.append(index)
    return np.array(keep, dtype=int)


def isoflop_slices(compute, budgets, tolerance: float = 0.03) -> np.ndarray:
    """The isoFLOP budget each run was trained for: budgets[j] where the run's compute lies within
    `tolerance` (relative) of it, NaN for runs on no budget. An isoFLOP run's whole-step count makes its
    compute miss the budget by up to half a step; a grid run counts where its compute falls on a budget too."""
    compute, budgets = np.asarray(compute, dtype=float), np.asarray(budgets, dtype=float)
    slices = np.full(compute.shape, np.nan)
    for budget in budgets:
        slices[np.abs(compute / budget - 1) <= tolerance] = budget
    return slices


def isoflop_parabola(log_params: np.ndarray, loss: np.ndarray) -> np.ndarray | None:
    """Coefficients (highest first) of the least-squares parabola of loss in log N, or None when it has no
    minimum: fewer than three sizes, or a parabola opening downwards."""
    if len(np.unique(log_params)) < 3:
        return None
    coefficients = np.polyfit(log_params, loss, 2)
    return coefficients if coefficients[0] > 0 else None


def isoflop_minima(params, compute, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chinchilla's approach 2: per compute budget (runs sharing a `compute` value: isoflop_slices), a
    parabola in log N through the losses, and its vertex. Returns (budgets, N_opt, L_opt) for the budgets with
    at least three sizes and an upward parabola whose vertex lies among them (an isoFLOP profile with no
    minimum inside the sizes tried says nothing: its vertex would be an extrapolation)."""
    params, compute, loss = (np.asarray(v, dtype=float) for v in (params, compute, loss))
    found = []
    for budget in np.unique(compute):
        at = compute == budget
        coefficients = isoflop_parabola(np.log(params[at]), loss[at])
        if coefficients is None:
            continue
        vertex = -coefficients[1] / (2 * coefficients[0])
        if np.log(params[at]).min() < vertex < np.log(params[at]).max():
            found.append((budget, np.exp(vertex), np.polyval(coefficients, vertex)))
    return tuple(np.array(column) for column in zip(*found, strict=True)) if found else (np.array([]),) * 3


@dataclasses.dataclass
class IsoflopFit:
    """Approach 2: the isoFLOP minima and the power laws N_opt = k C^a, D_opt = C / (6 N_opt) ~ C^(1 - a)
    through them (None with fewer than two minima). Their intervals come from a residual bootstrap: each slice's
    fitted parabola plus residuals drawn from all slices' (the sizes are a design, not a sample, so they stay),
    every parabola and vertex refitted. `draws` [bootstrap] of a; `redrawn` counts slice draws drawn again because
    their parabola had no minimum."""

    budgets: np.ndarray
    params: np.ndarray  # N_opt per budget
    loss: np.ndarray  # L at N_opt
    N: PowerLaw | None
    D: PowerLaw | None
    draws: np.ndarray | None = dataclasses.field(default=None, repr=False)
    redrawn: int = 0


def fit_isoflop(params, compute, loss, bootstrap: int = 0, level: float = 0.95, seed: int = 0) -> IsoflopFit:
    """Chinchilla's approach 2 on isoFLOP runs: `compute` holds each run's budget (isoflop_slices; runs on no
    budget are NaN and left out)."""
    params, compute, loss = (np.asarray(v, dtype=float) for v in (params, compute, loss))
    on = ~np.isnan(compute)
    params, compute, loss = params[on], compute[on], loss[on]
    budgets, optimal, optimal_loss = isoflop_minima(params, compute, loss)
    if len(budgets) < 2:
        return IsoflopFit(budgets, optimal, optimal_loss, None, None)
    n_law = fit_power_law(budgets, optimal)
    log_params = [np.log(params[compute == budget]) for budget in budgets]
    fitted = [np.polyval(isoflop_parabola(x, loss[compute == b]), x) for x, b in zip(log_params, budgets, strict=True)]
    residuals = np.concatenate([loss[compute == b] - f for b, f in zip(budgets, fitted, strict=True)])
    residuals *= np.sqrt(len(residuals) / (len(residuals) - 3 * len(budgets)))  # least squares leaves them too small
    rng = np.random.default_rng(seed)
    draws, redrawn = [], 0
    for _ in range(bootstrap):
        vertices = []  # log N_opt per slice
        for x, f in zip(log_params, fitted, strict=True):
            for _ in range(1000):
                coefficients = isoflop_parabola(x, f + rng.choice(residuals, len(f)))
                if coefficients is not None:
                    break
                redrawn += 1
            else:
                raise ValueError(f"an isoFLOP slice of {len(f)} runs had no minimum in 1000 bootstrap draws: its "
                                 "profile is flat within the noise; give it sizes further from its lowest loss")  # fmt: skip
            vertices.append(-coefficients[1] / (2 * coefficients[0]))
        draws.append(np.polyfit(np.log(budgets), vertices, 1)[0])
    if draws:
        n_law.interval = percentile_interval(draws, level)
    # D_opt = C / (6 N_opt) = C^(1 - a) / (6 k): its exponent and interval mirror N_opt's.
    d_interval = (1 - n_law.interval[1], 1 - n_law.interval[0]) if n_law.interval else None
    d_law = PowerLaw(1 - n_law.exponent, 1 / (6 * n_law.coefficient), d_interval)
    return IsoflopFit(budgets, optimal, optimal_loss, n_law, d_law, np.array(draws) if draws else None, redrawn)


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
