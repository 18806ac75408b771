"""The source's shape: no function in src/ is longer than a screen (60 lines), so each reads
as named stages. (Which folder may import which: the import-linter contracts in
pyproject.toml, checked by `make test`.) And the tests' shape: tests/ mirrors src/drpo/ (a
folder per stage), and every tests/ path the docs, the Makefile, pyproject.toml, .ci/, scripts/
and src/ name exists, so a moved test file cannot leave them pointing at nothing (the mutations'
test paths: scripts/mutations.py --check)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MAX_LINES = 60
TEST_PATH = re.compile(r"(?<![\w/.-])tests/[\w./-]*[\w/]")  # ends before a sentence's full stop


def long_functions(root: Path = SRC, limit: int = MAX_LINES) -> list[str]:
    """'path:line name (N lines)' for every function or method in `root` over `limit` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_the_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))  # def line + 60 = 61 lines
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path) == [f"{tmp_path.name}/m.py:5 long ({MAX_LINES + 1} lines)"]


def test_no_function_over_60_lines():
    offenders = long_functions()
    assert not offenders, "functions over 60 lines (split them into named stages):\n" + "\n".join(offenders)


def named_test_paths(root: Path = ROOT) -> dict[str, list[str]]:
    """Each tests/ path that README.md, docs/*.md, the Makefile, pyproject.toml, .ci/, scripts/ and
    src/ name -> the files naming it."""
    files = [root / "README.md", root / "Makefile", root / "pyproject.toml", *sorted((root / "docs").glob("*.md")),
             *sorted(p for top in (".ci", "scripts", "src") for p in (root / top).rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p))]
    found: dict[str, list[str]] = {}
    for f in files:
        if f.is_file():
            for path in TEST_PATH.findall(f.read_text(errors="replace")):
                found.setdefault(path, []).append(str(f.relative_to(root)))
    return found


def test_the_check_sees_test_paths():
    text = "run `tests/train/test_x.py::test_y`, see tests/integrations/verl. Not src/tests/a.py nor tests/."
    assert TEST_PATH.findall(text) == ["tests/train/test_x.py", "tests/integrations/verl"]


def test_every_named_test_path_exists():
    found = named_test_paths()
    assert "tests/integrations/verl" in found and "tests/train/test_main_job.py" in found  # it sees the Makefile, docs
    missing = {path: where for path, where in found.items() if not (ROOT / path).exists()}
    assert not missing, f"test paths named but not in the tree (moved? re-point them): {missing}"
