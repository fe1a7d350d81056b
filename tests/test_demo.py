"""`make demo` in miniature: every stage runs and writes what the README promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lvm.figures import MIN_SIDE
from scripts.demo import TASKS

pytestmark = pytest.mark.slow  # the whole demo, twice, in subprocesses

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"model", "copy_query", "no_context"}


def test_demo_smoke_runs_every_stage_and_reuses_outputs(tmp_path):
    """Catches a stage that fails or writes nothing, and a rerun that trains again instead of reusing."""
    command = [sys.executable, "-m", "scripts.demo", "--smoke", "--out", str(tmp_path)]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    scores = metrics["analogies"]
    assert set(scores["per_task"]) == set(TASKS)
    for group in (scores, *scores["per_task"].values()):
        for key in ("token_accuracy", "changed_token_accuracy", "psnr"):
            assert set(group[key]) >= METHODS
        assert group["changed_token_accuracy"]["copy_query"] == 0.0
    assert set(metrics["tokenizer"]["psnr_procedural"]) == set(TASKS) and metrics["tokenizer"]["psnr_photos"] > 0
    assert metrics["tokenizer"]["psnr_scenes"] > 0
    assert (tmp_path / "tokenizer" / "export" / "model.safetensors").exists()
    assert (tmp_path / "lvm" / "export" / "config.json").exists()
    vlm = metrics["vlm"]
    assert set(vlm["qa_exact_match"]) == {"model", "blank_image", "text_only"} and vlm["count"] > 0
    assert set(vlm["caption_f1"]) == {"model", "blank_image"}
    assert (tmp_path / "vlm" / "qa_grid.png").exists() and (tmp_path / "vlm" / "sft" / "export" / "config.json").exists()
    assert set(metrics["aim"]["probe_top1"]) == {"aim", "lvm", "random_init"} and metrics["aim"]["count"] > 0
    unified = metrics["unified"]
    assert set(unified["t2i_attribute_accuracy"]) == {"model", "unconditional", "shuffled_caption", "vq_round_trip",
                                                     "model_one_sample", "shuffled_caption_one_sample"}
    assert all(0 <= v <= 1 for v in unified["t2i_attribute_accuracy"].values())
    assert set(unified["i2t_exact_match"]) == {"model", "blank_image", "text_only"}
    assert (tmp_path / "unified" / "draw_grid.png").exists()
    assert (tmp_path / "unified" / "export" / "model.safetensors").exists()

    # labelled grids, one per task: a header row above one row per held-out prompt, images >= 96 px
    grids = {Path(p).stem: Image.open(p) for p in scores["grids"]}
    assert set(grids) == set(TASKS)
    for grid in grids.values():
        assert grid.height > MIN_SIDE + 20 and grid.width > 11 * MIN_SIDE  # 6 examples + 5 columns side by side
    summary = Image.open(tmp_path / "summary.png")
    assert summary.height > len(TASKS) * MIN_SIDE and summary.width > grids["edges"].width  # the table beside
    assert (tmp_path / "tokenizer_reconstructions.png").exists()
    tail = first.stdout[first.stdout.rindex("held-out analogies") :]  # the console ends with the table and paths
    assert all(task in tail for task in TASKS) and str(tmp_path / "summary.png") in tail
    assert "wandb:" not in first.stdout + first.stderr and "LeafSpec" not in first.stderr
    assert "not supported by the model summary" not in first.stderr  # the bf16-mixed LVM's summary note

    exports = [tmp_path / stage / "export" / "model.safetensors" for stage in ("tokenizer", "lvm", "unified")]
    written = [path.stat().st_mtime_ns for path in exports]
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    # A retrained stage exports again (an atomic replace: a new file with a new mtime).
    assert [path.stat().st_mtime_ns for path in exports] == written
    assert json.loads((tmp_path / "metrics.json").read_text())["shards"] == metrics["shards"]
