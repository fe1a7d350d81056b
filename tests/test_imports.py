"""Import hygiene: the packages load without the trainer stack, and lazy names still resolve."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [p for p in ("tokenizer", "data", "lvm", "vlm") if importlib.util.find_spec(p) is not None]
# Training and plotting stacks: seconds to import, and not needed to load a model and prompt it.
HEAVY = ("lightning", "pytorch_lightning", "wandb", "matplotlib", "torchmetrics")


@pytest.mark.slow
def test_packages_import_without_training_stack():
    """Catches a module-level `import lightning` (or wandb, matplotlib, ...) reaching the package inits."""
    code = (
        f"import sys\nimport {', '.join(PACKAGES)}\n"
        f"print(__import__('json').dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_lazy_names_resolve_to_the_lightning_classes():
    """Catches a lazy export that points at the wrong module or a name LightningCLI could not find."""
    import data
    import data.datamodule

    assert data.TokenDataModule is data.datamodule.TokenDataModule
    assert data.ShardSet is data.datamodule.ShardSet and data.TokenStream is data.datamodule.TokenStream
    for name in data.__all__:  # every advertised name resolves (eagerly or lazily)
        getattr(data, name)
