"""scripts/gpu-check.sh cannot rot between GPU leases: its CPU dry run passes every step and
reports every figure; its report marks a failed, timed-out or result-less step and exits 1;
the wheel plan installs exactly what is missing or too old.

The dry run uses this Python's packages (the wheel folder is pointed elsewhere), so it does
not depend on `make gpu-wheels` having run: CI may have no network for pip, and the wheels are
for the GPU machine's Python 3.12, not this one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.tags import sys_tags
from packaging.version import Version

from drpo.objectives import METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
STEPS = ["setup", "pytest", "objectives", "logprobs", "train", "trl"]
MAX_FILES, MAX_BYTES = 8, 16 * 2**20  # what the device tool brings back


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", ROOT / "scripts" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_WHEELS": str(out / "no-wheels-here")}
    # The script bounds itself (each step's limit; ~2.5 CPU minutes in all); this is a backstop.
    limit = 900 * float(os.environ.get("GPU_CHECK_LIMIT_SCALE", 1))
    proc = subprocess.Popen(["bash", str(SCRIPT), "--cpu-dry-run", str(out / "out")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stdout, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the script stops its running step, then exits
        stdout, _ = proc.communicate(timeout=60)
        pytest.fail(f"the dry run ran past {limit:.0f} s:\n{stdout}")
    return proc.returncode, stdout, out / "out"


@pytest.mark.slow
def test_cpu_dry_run_passes_every_step(dry_run):
    rc, stdout, out = dry_run
    assert rc == 0, stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert summary["ok"] and all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert [p.name for p in files] == sorted([f"{s}.log" for s in STEPS] + ["summary.md", "summary.json"])
    assert len(files) <= MAX_FILES and all(p.stat().st_size < MAX_BYTES for p in files)
    assert "nothing installed" in (out / "setup.log").read_text()  # says why no wheel was installed


@pytest.mark.slow
def test_cpu_dry_run_reports_every_figure(dry_run):
    out = dry_run[2]
    r = json.loads((out / "summary.json").read_text())["results"]
    md = (out / "summary.md").read_text()
    builtins = sorted(m for m in METHODS if not m.startswith("test_"))
    pytest_counts = r["pytest"]["pytest"]
    assert pytest_counts["tests"] >= 60 and pytest_counts["failures"] + pytest_counts["errors"] == 0
    for dtype in ("bf16", "fp32"):
        methods = r["objectives"][dtype]["methods"]
        assert sorted(methods) == builtins and r["objectives"][dtype]["dtype"] == {"bf16": "bfloat16"}.get(dtype, "float32")
        assert all(v["time_ms"] > 0 and v["peak_mib"] > 0 for v in methods.values())
    cases = r["logprobs"]["logprobs"]["cases"]
    assert sorted(cases) == sorted(["naive", "drpo", "trl", "liger", "drpo_fused", "compile"])
    assert not [c for c, v in cases.items() if "error" in v]
    for case in ("drpo", "trl", "compile"):  # the same log-probs and gradients as the naive computation
        assert cases[case]["check"] == pytest.approx(cases["naive"]["check"], rel=1e-4), case
    assert cases["drpo_fused"]["check"] == pytest.approx(cases["liger"]["check"], rel=1e-4)
    for label in ("tiny", "qwen2"):
        run = r["train"][label]
        assert run["ok"] and run["rl_steps"] == 2 and run["steps_per_s"] > 0 and run["peak_memory_mib"] > 0
    assert r["setup"]["policy"]["vocab"] == 151_936  # the Qwen2 vocabulary even at tiny size
    trl = r["trl"]["trl"]
    assert trl["equal"] and len(trl["trl"]["loss"]) == 2 and trl["trl"]["grad_norm"][0] > 0
    for figure in [*builtins, "torch.compile(naive)", "DRPOGRPOTrainer", "tiny", "qwen2", "host syncs per call"]:
        assert figure in md, figure


def write_steps(work: Path, rows):
    work.mkdir(parents=True, exist_ok=True)
    (work / "steps.tsv").write_text("".join(f"{n}\t{rc}\t1.0\t0.5\t60\n" for n, rc in rows))


def test_report_marks_failed_timed_out_and_resultless_steps(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    write_steps(work, [("setup", 0), ("pytest", 124), ("objectives", 1), ("trl", 0)])
    (work / "setup_policy.json").write_text(json.dumps(
        {"parameters": 10, "hidden": 8, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 16, "vocab": 300}))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu" / "summarize.py"), str(work), str(out), "gpu"],
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    steps = {s["name"]: s["status"] for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert steps == {"setup": "ok", "pytest": "TIMED OUT after 60 s", "objectives": "FAILED (exit 1)",
                     "trl": "FAILED (no result)"}
    md = (out / "summary.md").read_text()
    assert "TIMED OUT after 60 s" in md and "FAILED (exit 1)" in md and "no result (FAILED (no result)" in md
    assert "FAILED: pytest, objectives, trl" in proc.stdout


def make_wheel(folder: Path, name: str, version: str, requires=(), tag="py3-none-any") -> Path:
    """A minimal valid wheel: METADATA and WHEEL in its .dist-info."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_wheel_plan_installs_the_missing_and_the_too_old(tmp_path):
    wp = load("wheel_plan")
    a = make_wheel(tmp_path, "probe-a", "1.0", ["probe-b>=2", "probe-c>=1", "absent-x>=1", "probe-d; extra == 'dev'"])
    b = make_wheel(tmp_path, "probe-b", "2.0")
    make_wheel(tmp_path, "probe-c", "3.0")
    make_wheel(tmp_path, "probe-e", "1.0", tag="cp27-cp27mu-manylinux1_x86_64")
    tags = set(sys_tags())
    installed = {"probe-b": Version("1.5"), "probe-c": Version("1.0")}
    paths, log = wp.plan(tmp_path, installed, tags)
    # a is missing; b is installed but older than a needs; c is new enough; e is for another Python.
    assert paths == [a, b]
    assert any(line.startswith("skip probe_e-1.0") for line in log)
    assert "have probe-c 1.0: probe_c-3.0-py3-none-any.whl not installed" in log
    assert any("unmet requirement absent-x>=1" in line for line in log)
    assert not any("probe-d" in line for line in log)  # an extra's requirement does not apply
    paths, log = wp.plan(tmp_path, {**installed, "probe-a": Version("1.0")}, tags)
    assert paths == []  # nothing missing: nothing installed, whatever the installed ones need


def test_wheel_plan_refuses_two_versions_of_one_package(tmp_path):
    wp = load("wheel_plan")
    make_wheel(tmp_path, "probe-a", "1.0")
    make_wheel(tmp_path, "probe-a", "1.1")
    with pytest.raises(SystemExit, match="two wheels of probe-a"):
        wp.plan(tmp_path, {}, set(sys_tags()))


def test_gpu_wheels_are_exact_pins_listed_once():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "scripts" / "gpu" / "wheels.txt").read_text().splitlines()]
    pins = [ln for ln in lines if ln]
    assert pins and all(ln.count("==") == 1 for ln in pins)
    names = [ln.split("==")[0].lower() for ln in pins]
    assert len(set(names)) == len(names)
    assert {"pydantic", "pydantic-core", "trl", "liger-kernel", "datasets"} <= set(names)
    assert "scripts/gpu/wheels.txt" in (ROOT / "Makefile").read_text()
