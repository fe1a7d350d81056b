"""The notebooks run end to end in their small mode (CI): notebooks/scaling_laws.ipynb."""

import csv
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # executes the notebook

papermill = pytest.importorskip("papermill")  # the `dev` extra

ROOT = Path(__file__).resolve().parents[1]


def test_scaling_laws_notebook_in_smoke_mode(tmp_path):
    notebook = ROOT / "notebooks" / "scaling_laws.ipynb"
    executed = papermill.execute_notebook(
        str(notebook), str(tmp_path / "executed.ipynb"), parameters={"mode": "smoke", "out": str(tmp_path / "sweep")},
        cwd=str(notebook.parent), kernel_name="python3", progress_bar=False,
    )  # fmt: skip
    with open(tmp_path / "sweep" / "sweep.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4  # 2 sizes x 2 lengths
    for plot in ("loss_curves.png", "frontier.png", "isoflop.png", "chinchilla.png"):
        assert (tmp_path / "sweep" / plot).stat().st_size > 0
    fits = json.loads((tmp_path / "sweep" / "fits.json").read_text())
    assert fits["runs"] == 4 and set(fits["approach3"]) >= {"alpha", "beta", "N_opt_exponent"}
    assert fits["held_out"]["observed"] > 0
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "Epoch AI" in printed and "alpha" in printed
