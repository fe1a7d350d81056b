"""Every third-party import is declared in pyproject.toml, so a fresh `pip install` can run the code.

Walks every .py file and notebook of the repository with `ast` (module level and inside functions,
guarded or not) and maps each imported top-level module to the distribution that provides it.
"""

import ast
import json
import os
import re
import sys
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"shared", ".git", ".venv", "build", "runs", "node_modules", "__pycache__", ".ipynb_checkpoints"}
PACKAGES = ("tokenizer", "data", "lvm", "vlm")  # what `pip install .` ships

# Import names whose distribution is named otherwise (used also when the package is not installed here).
DISTRIBUTIONS = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "cv2": "opencv-python",
    "open_clip": "open-clip-torch",
    "taming": "taming-transformers-rom1504",
    "lightning": "lightning",
    "pytorch_lightning": "lightning",
    "av": "av",
    "xformers": "xformers",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0))


@cache
def declared() -> dict[str, set[str]]:
    """{"core": names in dependencies, "<extra>": names in that extra} from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project.get("optional-dependencies", {})}
    return {group: {requirement_name(r) for r in requirements} for group, requirements in groups.items()}


@cache
def sources() -> list[tuple[Path, str]]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for path in (Path(folder) / f for f in sorted(files)):
            if path.suffix == ".py":
                found.append((path, path.read_text()))
            elif path.suffix == ".ipynb":
                cells = json.loads(path.read_text())["cells"]
                code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
                # IPython magics and shell escapes are not Python
                code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
                found.append((path, code))
    return found


def local_modules(path: Path) -> set[str]:
    """Modules importable without installing anything: the repository's top level, and (pytest's
    rootdir-relative imports, scripts run from their folder) the importing file's own folder."""
    names = set()
    for folder in (ROOT, path.parent):
        names |= {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
    return names


def third_party_imports(path: Path, source: str) -> list[tuple[str, int, bool]]:
    """(top-level module, line, at module level and unguarded) for every absolute import."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    local = local_modules(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            name = module.split(".")[0]
            if name not in sys.stdlib_module_names and name not in local:
                found.append((name, node.lineno, id(node) in top_level))
    return found


@cache
def installed() -> dict[str, list[str]]:
    return packages_distributions()  # scans every installed distribution: once


def distributions(module: str) -> set[str]:
    if module in DISTRIBUTIONS:
        return {normalize(DISTRIBUTIONS[module])}
    return {normalize(d) for d in installed().get(module, [module])}


def test_every_import_is_declared():
    """Catches a new `import foo` (anywhere: package, script, test, notebook) that a fresh install lacks."""
    everything = set().union(*declared().values())
    undeclared = [
        f"{path.relative_to(ROOT)}:{line}: import {module} (distribution {' or '.join(sorted(distributions(module)))})"
        for path, source in sources()
        for module, line, _ in third_party_imports(path, source)
        if not distributions(module) & everything
    ]
    assert not undeclared, "declare these in pyproject.toml (dependencies or an extra):\n" + "\n".join(undeclared)


def test_package_module_level_imports_are_core_dependencies():
    """Catches a package module that imports an optional extra at module level: `import lvm` would
    then fail after a plain `pip install .` (optional ones belong inside the function that needs them)."""
    core = declared()["core"]
    offending = [
        f"{path.relative_to(ROOT)}:{line}: import {module}"
        for path, source in sources()
        if path.relative_to(ROOT).parts[0] in PACKAGES
        for module, line, module_level in third_party_imports(path, source)
        if module_level and not distributions(module) & core
    ]
    assert not offending, "make these core dependencies or import them where used:\n" + "\n".join(offending)


def test_the_checker_sees_imports_in_functions_and_maps_names(tmp_path):
    """Catches a walker that reads only module-level imports or looks up `PIL` as a distribution."""
    source = "import os\nimport PIL.Image\n\ndef f():\n    import xformers.ops\n    from sklearn import svm\n"
    found = third_party_imports(tmp_path / "x.py", source)
    assert [(m, top) for m, _, top in found] == [("PIL", True), ("xformers", False), ("sklearn", False)]
    assert distributions("PIL") == {"pillow"} and distributions("sklearn") == {"scikit-learn"}
