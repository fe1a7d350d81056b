"""lvm.scaling: sizes and FLOPs, fits that recover known laws from noisy data, the Chinchilla runs
against Epoch AI's published fit, and the sweep runner through the real train.py."""

import csv

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


def test_chinchilla_law_recovers_its_parameters_from_noisy_losses():
    rng = np.random.default_rng(0)
    params, tokens = 10 ** rng.uniform(7, 10.5, 200), 10 ** rng.uniform(9, 12, 200)
    loss = TRUE.predict(params, tokens) * np.exp(rng.normal(0, 0.01, 200))
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


def test_isoflop_minima_of_a_sizes_by_steps_grid_find_the_optimal_size():
    sizes = np.logspace(8, 10, 9)
    tokens = np.logspace(9, 12, 13)
    params, steps = (grid.ravel() for grid in np.meshgrid(sizes, tokens))
    compute = 6 * params * steps
    budgets = np.array([1e19, 1e20])
    points = scaling.isoflop_points(params, compute, TRUE.predict(params, steps), budgets)
    found, optimal, _ = scaling.isoflop_minima(*points)
    np.testing.assert_allclose(found, budgets)
    np.testing.assert_allclose(np.log(optimal), np.log(TRUE.compute_optimal(budgets)[0]), atol=0.15)


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


# -- the sweep runner, through train.py -------------------------------------------------------------------
def test_sweep_trains_each_run_once_and_tabulates_its_logs(tmp_path, monkeypatch):
    train, val = scaling.demo_shards(tmp_path / "shards", train=8, val=4)
    tiny = ["--data.init_args.train", train, "--data.init_args.val", val, "--data.init_args.val_fraction", "0",
            "--data.init_args.seq_len", "256", "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", "0", "--model.init_args.warmup_steps", "1"]  # fmt: skip
    argv = ["sweep", "--out", str(tmp_path / "sweep"), "--sizes", "32x1", "--steps", "1,2", "--", *tiny]
    rows = scaling.main(argv)

    with open(tmp_path / "sweep" / scaling.TABLE, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["h32-l1-s1", "h32-l1-s2"]
    config = LVMConfig.from_name("vqlm_demo", **scaling.size_overrides(32, 1))
    for row in table:
        run_dir = tmp_path / "sweep" / "runs" / row["run"]
        with open(run_dir / "metrics.csv", newline="") as f:
            metrics = list(csv.DictReader(f))
        val_losses = [float(m["val/loss"]) for m in metrics if m["val/loss"]]
        assert len(val_losses) == 1 and float(row["val_loss"]) == pytest.approx(val_losses[0])
        assert float(row["train_loss"]) == pytest.approx([float(m["train/loss"]) for m in metrics if m["train/loss"]][-1])
        steps = int(row["steps"])
        assert max(int(m["step"]) for m in metrics if m["train/loss"]) == steps - 1
        assert int(row["tokens"]) == steps * 2 * 256
        assert int(row["non_embedding_params"]) == scaling.num_params(config, non_embedding=True)
        assert int(row["flops"]) == scaling.flops_per_token(config, 256) * int(row["tokens"])

    # Again: nothing is trained, except a run that never finished.
    trained = []
    monkeypatch.setattr(scaling, "run_one", lambda run_dir, *args: trained.append(run_dir.name))
    (tmp_path / "sweep" / "runs" / "h32-l1-s2" / "finished").unlink()
    assert scaling.main(argv) == rows
    assert trained == ["h32-l1-s2"]
