"""scripts/mutations.py still applies every mutation to this tree: a refactor that moves or changes
a mutated line makes CI fail here, naming the mutation to re-point, instead of leaving the
mutation run to stop (or test nothing) later."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("drpo_mutations_script", ROOT / "scripts" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutation_still_applies(capsys):
    assert _script().main(["--check"]) == 0, capsys.readouterr().err


def test_a_stale_mutation_is_named_before_any_test_runs(tmp_path, capsys):
    mutations = _script()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "moved.py").write_text("x = 1\nx = 1\n")
    mutations.MUTATIONS.update({
        "gone-file": ("src/missing.py", "x = 1", "x = 2", ["tests"], mutations.PY),
        "twice": ("src/moved.py", "x = 1", "x = 2", ["tests"], mutations.PY),
        "absent": ("src/moved.py", "y = 1", "y = 2", ["tests"], mutations.PY),
    })
    assert "does not exist" in mutations.stale("gone-file", tmp_path)
    assert "occurs 2 times" in mutations.stale("twice", tmp_path)
    assert "occurs 0 times" in mutations.stale("absent", tmp_path)
    assert mutations.main(["absent", "trl-is-ratio"]) == 2  # stops before running trl-is-ratio's tests
    err = capsys.readouterr().err
    assert "mutation 'absent'" in err and "src/moved.py" in err and "trl-is-ratio" not in err


def test_a_mutation_naming_a_moved_test_file_is_named(tmp_path, capsys):
    mutations = _script()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_here.py").write_text("")
    mutations.MUTATIONS.update({
        "test-moved": ("src/m.py", "x = 1", "x = 2", ["tests/test_here.py", "tests/test_gone.py::test_x", "-k",
                                                        "tests/not_a_path"], mutations.PY),
        "test-here": ("src/m.py", "x = 1", "x = 2", ["tests/test_here.py::test_x", "-k", "x"], mutations.PY),
    })
    assert mutations.tested_paths(mutations.MUTATIONS["test-moved"][3]) == ["tests/test_here.py", "tests/test_gone.py"]
    assert "tests/test_gone.py do not exist" in mutations.stale("test-moved", tmp_path)
    assert mutations.stale("test-here", tmp_path) is None
    del mutations.MUTATIONS["test-here"]
    mutations.MUTATIONS["test-moved"] = ("src/drpo/objectives/methods.py", "", "", ["tests/test_gone.py"], mutations.PY)
    assert mutations.main(["--check"]) == 2  # on this tree: its own mutations pass, the moved test is named
    err = capsys.readouterr().err
    assert err.strip() == "mutation 'test-moved': its tests tests/test_gone.py do not exist (moved?); re-point them"
