"""The source's shape: no function in src/ is longer than a screen (60 lines), so each reads
as named stages. (Which folder may import which: the import-linter contracts in
pyproject.toml, checked by `make test`.)"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 60


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
