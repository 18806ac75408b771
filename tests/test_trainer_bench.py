"""benchmarks/trainer.py runs end to end (1 step each) and prints its ratio line."""

import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "trainer.py"


@pytest.mark.slow
def test_trainer_benchmark_smoke(capsys):
    spec = importlib.util.spec_from_file_location("trainer_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--steps", "1", "--warmup", "0", "--prompts", "2", "--group", "2", "--max-new-tokens", "3",
            "--no-warmstart", "--threads", "1"]
    assert bench.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"trainer: steps_per_s_vs_trl=(\S+) tokens_per_s_vs_trl=(\S+)", last)
    assert m, last
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
