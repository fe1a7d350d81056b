"""lvm.scaling: sizes and FLOPs, fits that recover known laws from noisy data, the Chinchilla runs
against Epoch AI's published fit."""

import numpy as np
import pytest

from lvm import LVM, LVMConfig, scaling

# A coarse grid (3^5 = 243 starts) finds the same optimum as Epoch AI's 4500 on these problems, ~20x sooner.
COARSE = scaling.Grid(e=(-1, 0, 1), intercept=(0, 10, 20), slope=(0, 1, 2))
TRUE = scaling.ChinchillaLaw(**scaling.EPOCH_AI_FIT)


def test_sizes_are_the_models_own_counts():
    config = LVMConfig.from_name("vqlm_tiny")
    model = LVM(config)
    assert scaling.num_params(config) == model.num_params()
    assert scaling.num_params(config, non_embedding=True) == model.num_params() - config.vocab_size * config.hidden_size
    n = scaling.num_params(config, non_embedding=True)
    assert scaling.flops_per_token(config, 512) == 6 * n + 12 * config.num_layers * config.hidden_size * 512
    assert round(scaling.num_params(LVMConfig.from_name("vqlm_7b")) / 1e9, 2) == 6.54  # DESIGN.md's table


def test_compute_law_recovers_its_parameters_from_noisy_losses():
    rng = np.random.default_rng(0)
    compute = np.logspace(15, 21, 40)
    loss = (2.0 + 300.0 * compute**-0.15) * np.exp(rng.normal(0, 0.005, compute.size))
    law = scaling.fit_compute_law(compute, loss, grid=COARSE, bootstrap=10)
    assert law.E == pytest.approx(2.0, rel=0.05)
    assert law.b == pytest.approx(0.15, rel=0.1)
    assert np.log(law.a) == pytest.approx(np.log(300.0), rel=0.1)
    for name in ("E", "a", "b"):
        low, high = law.intervals[name]
        assert low <= getattr(law, name) <= high


def noisy_runs(seed: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` (params, tokens, loss) runs spread over 3.5 and 3 decades, losses from TRUE with 1% noise."""
    rng = np.random.default_rng(seed)
    params, tokens = 10 ** rng.uniform(7, 10.5, count), 10 ** rng.uniform(9, 12, count)
    return params, tokens, TRUE.predict(params, tokens) * np.exp(rng.normal(0, 0.01, count))


@pytest.mark.slow
def test_chinchilla_law_recovers_its_parameters_from_noisy_losses():
    params, tokens, loss = noisy_runs(seed=0, count=200)
    fit = scaling.fit_chinchilla(params, tokens, loss, grid=COARSE, bootstrap=10)
    assert fit.E == pytest.approx(TRUE.E, rel=0.05)
    assert fit.alpha == pytest.approx(TRUE.alpha, abs=0.03)
    assert fit.beta == pytest.approx(TRUE.beta, abs=0.03)
    assert set(fit.intervals) == {"E", "A", "B", "alpha", "beta"}
    assert all(low <= high for low, high in fit.intervals.values())


def test_compute_optimal_split_minimises_the_loss_at_fixed_compute():
    budget = 1e21
    params, tokens = TRUE.compute_optimal(budget)
    assert 6 * params * tokens == pytest.approx(budget)
    sizes = params * np.logspace(-1, 1, 201)
    losses = TRUE.predict(sizes, budget / (6 * sizes))
    assert sizes[np.argmin(losses)] == pytest.approx(params, rel=0.03)


def isoflop_runs(seed: int, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An isoFLOP design on TRUE: 4 budgets over 3 decades, 7 sizes from 1/8 to 8x each budget's optimum,
    each trained for C / 6N tokens; (params, budget, loss) with `noise` relative noise on the losses."""
    budgets = np.logspace(18, 21, 4)
    budget, factor = (grid.ravel() for grid in np.meshgrid(budgets, np.geomspace(1 / 8, 8, 7)))
    params = TRUE.compute_optimal(budget)[0] * factor
    loss = TRUE.predict(params, budget / (6 * params)) * np.exp(np.random.default_rng(seed).normal(0, noise, params.size))
    return params, budget, loss


def test_isoflop_fit_finds_the_optimal_sizes_and_exponents_with_intervals():
    params, budget, loss = isoflop_runs(seed=0, noise=0.003)
    fit = scaling.fit_isoflop(params, budget, loss, bootstrap=200)
    np.testing.assert_allclose(fit.budgets, np.logspace(18, 21, 4))
    np.testing.assert_allclose(np.log(fit.params), np.log(TRUE.compute_optimal(fit.budgets)[0]), atol=0.25)
    truth = TRUE.beta / (TRUE.alpha + TRUE.beta)  # Hoffmann et al.'s N_opt ~ C^a, a = beta / (alpha + beta)
    assert fit.N.exponent == pytest.approx(truth, abs=0.03)
    assert fit.N.interval[0] < truth < fit.N.interval[1] and fit.N.interval[1] - fit.N.interval[0] < 0.15
    assert fit.N.exponent + fit.D.exponent == pytest.approx(1.0)  # C = 6 N D
    assert fit.D.interval == pytest.approx((1 - fit.N.interval[1], 1 - fit.N.interval[0]))
    assert fit.D.predict(1e20) == pytest.approx(1e20 / (6 * fit.N.predict(1e20)))
    # Noisier losses: a wider interval about the same exponent.
    noisy = scaling.fit_isoflop(*isoflop_runs(seed=0, noise=0.02), bootstrap=200)
    assert noisy.N.interval[1] - noisy.N.interval[0] > fit.N.interval[1] - fit.N.interval[0]


def test_isoflop_slices_put_each_run_on_the_budget_it_spent():
    compute = np.array([1e15, 1.02e15, 0.98e15, 1.5e15, 4.1e15, 9e15])
    slices = scaling.isoflop_slices(compute, [1e15, 4e15])
    np.testing.assert_array_equal(slices[:3], 1e15)
    assert np.isnan(slices[3]) and slices[4] == 4e15 and np.isnan(slices[5])
    # Runs on no budget are left out of the fit, and a single slice gives no exponent.
    fit = scaling.fit_isoflop([1e6, 2e6, 4e6, 1e6], [1e15, 1e15, 1e15, np.nan], [3.0, 2.9, 3.0, 1.0])
    assert fit.params == pytest.approx([2e6], rel=0.01) and fit.N is None


@pytest.mark.slow
def test_chinchilla_runs_give_epoch_ais_estimate():
    params, tokens, loss = scaling.load_chinchilla()
    assert len(loss) == 240  # the 245 runs without Epoch AI's 5 outliers
    fit = scaling.fit_chinchilla(params, tokens, loss, grid=COARSE)
    published = scaling.EPOCH_AI_FIT
    assert fit.E == pytest.approx(published["E"], abs=0.01)
    assert fit.alpha == pytest.approx(published["alpha"], abs=0.005)
    assert fit.beta == pytest.approx(published["beta"], abs=0.005)
    assert fit.A == pytest.approx(published["A"], rel=0.05)
    assert fit.B == pytest.approx(published["B"], rel=0.05)


@pytest.mark.slow
def test_compute_optimal_exponents_and_their_intervals_follow_alpha_and_beta():
    params, tokens, loss = noisy_runs(seed=1, count=100)
    fit = scaling.fit_chinchilla(params, tokens, loss, grid=COARSE, bootstrap=20)
    exponents = fit.optimal_exponents()
    assert exponents["N"][0] == pytest.approx(fit.beta / (fit.alpha + fit.beta))
    assert exponents["N"][0] + exponents["D"][0] == pytest.approx(1.0)  # C = 6 N D: the two exponents sum to 1
    truth = TRUE.beta / (TRUE.alpha + TRUE.beta)
    low, high = exponents["N"][1]
    assert low < high and abs(exponents["N"][0] - truth) < 0.05
    assert fit.draws.shape == (20, 5)


def test_power_law_fit_recovers_the_exponent_with_an_interval_around_it():
    rng = np.random.default_rng(2)
    compute = np.logspace(15, 20, 12)
    optimal = 3e-2 * compute**0.45 * np.exp(rng.normal(0, 0.05, 12))
    law = scaling.fit_power_law(compute, optimal, bootstrap=200)
    assert law.exponent == pytest.approx(0.45, abs=0.03)
    assert law.interval[0] < law.exponent < law.interval[1] and law.interval[1] - law.interval[0] < 0.1
    assert law.predict(1e18) == pytest.approx(3e-2 * 1e18**0.45, rel=0.2)


def test_pareto_frontier_keeps_the_runs_no_cheaper_run_beats():
    compute = np.array([1, 2, 2, 4, 8, 8, 16.0])
    loss = np.array([5, 4, 4.5, 4.2, 3, 3.5, 3.1])
    np.testing.assert_array_equal(scaling.pareto_frontier(compute, loss), [0, 1, 4])


def test_isoflop_minima_skip_profiles_whose_minimum_lies_outside_the_sizes():
    params = np.array([1e6, 2e6, 4e6, 1e6, 2e6, 4e6])
    compute = np.array([1e15] * 3 + [1e16] * 3)
    loss = np.array([3.0, 2.9, 3.0, 2.8, 2.6, 2.5])  # the second budget still falls at the largest size
    found, optimal, _ = scaling.isoflop_minima(params, compute, loss)
    np.testing.assert_allclose(found, [1e15])
    assert optimal[0] == pytest.approx(2e6, rel=0.01)
