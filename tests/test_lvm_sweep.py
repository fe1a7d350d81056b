"""lvm.sweep: the sweep runner through the real train.py, its table and its resume."""

import csv

import pytest

from lvm import LVMConfig, scaling, sweep

pytestmark = pytest.mark.slow  # trainings through train.py


def test_sweep_trains_each_run_once_and_tabulates_its_logs(tmp_path, monkeypatch):
    train, val = sweep.demo_shards(tmp_path / "shards", train=8, val=4)
    tiny = ["--data.init_args.train", train, "--data.init_args.val", val, "--data.init_args.val_fraction", "0",
            "--data.init_args.seq_len", "256", "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", "0", "--model.init_args.warmup_steps", "1"]  # fmt: skip
    argv = ["--out", str(tmp_path / "sweep"), "--sizes", "32x1", "--steps", "1,2", "--", *tiny]
    rows = sweep.main(argv)

    with open(tmp_path / "sweep" / sweep.TABLE, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["h32-l1-s1", "h32-l1-s2"]
    config = LVMConfig.from_name("vqlm_demo", **sweep.size_overrides(32, 1))
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
    monkeypatch.setattr(sweep, "run_one", lambda run_dir, *args, **kwargs: trained.append(run_dir.name))
    (tmp_path / "sweep" / "runs" / "h32-l1-s2" / "finished").unlink()
    assert sweep.main([*argv[:6], "--no-train"]) == rows[:1]  # the finished run only, and nothing trained
    assert trained == []
    assert sweep.main(argv) == rows
    assert trained == ["h32-l1-s2"]


def test_isoflop_runs_spend_each_budget_and_leave_out_too_short_runs():
    sizes = [(8, 1), (16, 1), (128, 2)]
    runs = sweep.isoflop_runs("configs/lvm/demo.yaml", sizes, [2e10, 8e10], tokens_per_step=1032)
    # 128x2 (N = 480k) would spend 8e10 in 27 steps: fewer than min_steps, so it is left out of both budgets.
    assert [size for size, _ in runs] == [(8, 1), (16, 1), (8, 1), (16, 1)]
    for (size, steps), budget in zip(runs, [2e10, 2e10, 8e10, 8e10], strict=True):
        n = scaling.num_params(LVMConfig.from_name("vqlm_demo", **sweep.size_overrides(*size)), non_embedding=True)
        assert abs(6 * n * steps * 1032 - budget) <= 6 * n * 1032 / 2  # within half a step of the budget
