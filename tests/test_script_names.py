"""No file in a folder of scripts shadows a module that drpo or its dependencies import.

`python benchmarks/x.py` puts `benchmarks/` first on sys.path (pytest does the same for the
test folders), so a `benchmarks/inspect.py` is what `import inspect` finds in torch and numpy:
the script dies at import with "partially initialized module 'inspect'"."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("benchmarks", "examples", "scripts", "tests")


def importable_names(folder: Path) -> set[str]:
    """The top-level names a folder's .py files and packages take when it leads sys.path."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.parent.name for p in folder.glob("*/__init__.py")}
    return names


def script_folders() -> list[Path]:
    """Every folder a script or test is run from (each subfolder too: tests/integrations/verl, examples/trl)."""
    folders = []
    for top in SCRIPT_DIRS:
        folders += [p for p in [ROOT / top, *(ROOT / top).rglob("*")] if p.is_dir() and "__pycache__" not in p.parts]
    return folders


def taken_names() -> set[str]:
    """The standard library's modules, every installed distribution's top-level names, drpo."""
    return set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions()) | {"drpo"}


def test_no_script_shadows_a_module():
    taken = taken_names()
    assert {"inspect", "torch", "numpy"} <= taken  # the check sees what it must
    clashes = sorted(f"{folder.relative_to(ROOT)}/{name}" for folder in script_folders()
                     for name in importable_names(folder) & taken)
    assert not clashes, f"these shadow a standard-library or installed module when run as scripts: {clashes}"


def test_a_shadowing_file_is_caught(tmp_path):
    (tmp_path / "inspect.py").write_text("")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    assert importable_names(tmp_path) & taken_names() == {"inspect", "torch"}
