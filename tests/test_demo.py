"""`make demo` in miniature: every stage runs and writes what the README promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the whole demo, twice, in subprocesses

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"model", "copy_query", "no_context"}


def test_demo_smoke_runs_every_stage_and_reuses_outputs(tmp_path):
    """Catches a stage that fails or writes nothing, and a rerun that trains again instead of reusing."""
    command = [sys.executable, "-m", "scripts.demo", "--smoke", "--out", str(tmp_path)]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("token_accuracy", "changed_token_accuracy", "psnr"):
        assert set(metrics[key]) >= METHODS
    assert metrics["changed_token_accuracy"]["copy_query"] == 0.0
    assert list((tmp_path / "grids").glob("*.png")) and (tmp_path / "tokenizer_reconstructions.png").exists()
    assert (tmp_path / "tokenizer" / "export" / "model.safetensors").exists()
    assert (tmp_path / "lvm" / "export" / "config.json").exists()

    exports = [tmp_path / stage / "export" / "model.safetensors" for stage in ("tokenizer", "lvm")]
    written = [path.stat().st_mtime_ns for path in exports]
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    # A retrained stage exports again (an atomic replace: a new file with a new mtime).
    assert [path.stat().st_mtime_ns for path in exports] == written
    assert json.loads((tmp_path / "metrics.json").read_text())["shards"] == metrics["shards"]
