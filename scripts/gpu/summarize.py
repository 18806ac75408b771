"""scripts/gpu-check.sh's report: OUT_DIR/summary.md (every figure, the device, the versions)
and OUT_DIR/summary.json (the same data), from the steps' exit codes (WORK/steps.tsv) and
result files (WORK/<step>*.json, WORK/pytest.xml). Exit 1 when any step failed or left no result.

    python scripts/gpu/summarize.py WORK OUT_DIR MODE
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PACKAGES = ("torch", "triton", "transformers", "accelerate", "trl", "liger-kernel", "datasets", "pydantic")
TIMEOUT_CODES = (124, 137)  # timeout(1): the limit was reached (137: killed after the grace period)


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "packages": versions,
    }


def read_steps(work: Path) -> list[dict]:
    """One row per step the script ran: name, exit code, wall and CPU seconds, limit."""
    rows = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, rc, seconds, cpu, limit = line.split("\t")
        rows.append({"name": name, "exit_code": int(rc), "seconds": float(seconds), "cpu_s": float(cpu),
                     "limit_s": int(limit)})
    return rows


def pytest_result(work: Path) -> dict | None:
    path = work / "pytest.xml"
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed_tests": failed}


def results(work: Path, name: str) -> dict:
    """The step's result files by their name's tail: objectives_bf16.json -> {"bf16": ...}."""
    found = {}
    for path in sorted(work.glob(f"{name}*.json")):
        key = path.stem[len(name):].lstrip("_") or name
        found[key] = json.loads(path.read_text())
    if name == "pytest" and (r := pytest_result(work)) is not None:
        found["pytest"] = r
    return found


def status(step: dict, found: dict) -> str:
    """ok, or why not: a step that exits 0 but wrote no result file has failed too."""
    if step["exit_code"] in TIMEOUT_CODES:
        return f"TIMED OUT after {step['limit_s']} s"
    if step["exit_code"] != 0:
        return f"FAILED (exit {step['exit_code']})"
    return "ok" if found else "FAILED (no result)"


def _num(v, fmt: str = ".3g") -> str:
    return "n/a" if v is None else format(v, fmt)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows
    ]


def render_pytest(found: dict) -> list[str]:
    r = found.get("pytest")
    if r is None:
        return ["no JUnit report"]
    lines = [f"{r['passed']} passed, {r['failures'] + r['errors']} failed, {r['skipped']} skipped (of {r['tests']})"]
    return lines + [f"- failed: `{t}`" for t in r["failed_tests"]]


def render_objectives(found: dict) -> list[str]:
    lines = []
    for dtype, r in found.items():
        lines += ["", f"loss+backward over {r['tokens']:,} tokens, {r['dtype']} inputs, {r['device']}, "
                      f"median of {r['repeats']}, validate={r['validate']}:", ""]
        lines += table(["method", "time ms", "peak MiB", "time/grpo", "memory/grpo", "host syncs per call"],
                       [[m, _num(v["time_ms"], ".2f"), _num(v["peak_mib"], ".1f"), _num(v["time_vs_grpo"], ".2f"),
                         _num(v["memory_vs_grpo"], ".2f"), _num(v["host_syncs_per_call"], "d")]
                        for m, v in r["methods"].items()])
    return lines


def render_logprobs(found: dict) -> list[str]:
    lines = []
    for r in found.values():
        s = r["settings"]
        lines += ["", f"token log-probs forward+backward, {s['tokens']:,} tokens, vocab {s['vocab']:,}, hidden "
                      f"{s['hidden']}, {s['dtype']}, {r['where']}, best of {s['repeats']}:", ""]
        naive = r["cases"].get("naive", {})
        rows = []
        for case, c in r["cases"].items():
            if "error" in c:
                rows.append([r["labels"][case], "failed: " + c["error"].strip().splitlines()[-1][:120], "", "", ""])
                continue
            rel = "error" not in naive and naive
            rows.append([r["labels"][case], _num(c["peak_mb"], ".1f"), _num(c["time_s"], ".4f"),
                         _num(c["peak_mb"] / rel["peak_mb"] if rel else None, ".3f"),
                         _num(c["time_s"] / rel["time_s"] if rel else None, ".3f")])
        lines += table(["case", "peak MiB", "time s", "memory/naive", "time/naive"], rows)
        if r.get("ratios"):
            lines += ["", "ratios (drpo / other): " + ", ".join(f"{k}={_num(v)}" for k, v in r["ratios"].items())]
    return lines


def render_train(found: dict) -> list[str]:
    rows = [[r["label"], r["device"], "ok" if r["ok"] else f"FAILED (exit {r['exit_code']})", r["rl_steps"],
             _num(r["steps_per_s"]), _num(r["median_step_s"]), _num(r["wall_s"], ".1f"),
             f"{_num(r['peak_memory_mib'], '.0f')} ({r['peak_memory_kind']})", _num(r["final_loss"], ".4g")]
            for r in found.values()]
    lines = [""] + table(["run", "device", "status", "RL steps", "steps/s (after the 1st)", "median step s",
                          "wall s (all)", "peak MiB", "final loss"], rows)
    return lines + [f"- `{r['label']}`: `drpo train {' '.join(r['args'])}`" for r in found.values()]


def render_trl(found: dict) -> list[str]:
    lines = []
    for r in found.values():
        s = r["settings"]
        lines += ["", f"{s['steps']} steps, batch {s['batch']} completions, {s['generations']} per prompt, "
                      f"{s['completion_len']} new tokens, num_iterations 2, fp32, {r['trl']['device']}:", ""]
        lines += table(["trainer", "steps/s (after the 1st)", "peak MiB", "loss per step", "grad norm per step"],
                       [[t["trainer"], _num(t["steps_per_s"]), _num(t["peak_memory_mib"], ".0f"),
                         ", ".join(f"{v:.6g}" for v in t["loss"]), ", ".join(f"{v:.6g}" for v in t["grad_norm"])]
                        for t in (r["trl"], r["drpo"])])
        lines += ["", f"equal loss and grad norm (rel 1e-4): **{r['equal']}**; max |loss difference| "
                      f"{_num(r['max_abs_loss_diff'])}; steps/s drpo/TRL {_num(r['steps_per_s_drpo_vs_trl'])}"]
    return lines


def render_setup(found: dict) -> list[str]:
    p = found["policy"]
    return [f"random Qwen2-shaped policy: {p['parameters']:,} parameters (hidden {p['hidden']}, {p['layers']} layers, "
            f"{p['heads']}/{p['kv_heads']} heads, MLP {p['intermediate']}, vocabulary {p['vocab']:,}, tied embeddings)"]


RENDER = {"setup": render_setup, "pytest": render_pytest, "objectives": render_objectives, "logprobs": render_logprobs,
          "train": render_train, "trl": render_trl}
TITLES = {"setup": "Set-up (wheels, policy)", "pytest": "`pytest -m cuda`", "objectives": "benchmarks/objectives.py",
          "logprobs": "benchmarks/logprobs.py", "train": "`drpo train`", "trl": "TRL GRPOTrainer vs DRPOGRPOTrainer"}


def render(mode: str, commit: str, env: dict, steps: list[dict], found: dict[str, dict]) -> list[str]:
    total = sum(s["seconds"] for s in steps)
    pk = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    lines = [f"GPU check ({mode}) on {env['device']}, {env['date_utc']} UTC, commit {commit}: "
             f"`scripts/gpu-check.sh{' --cpu-dry-run' if mode == 'cpu-dry-run' else ''} OUT_DIR`, {total:.0f} s.", "",
             f"Python {env['python']}, CUDA {env['torch_cuda'] or 'n/a'} (torch's), {pk}."
             + (f" Device memory {env['device_memory_gib']:.0f} GiB." if env["device_memory_gib"] else ""), ""]
    lines += table(["step", "status", "seconds (limit)", "CPU seconds"],
                   [[s["name"], s["status"], f"{s['seconds']:.0f} ({s['limit_s']})", f"{s['cpu_s']:.0f}"] for s in steps])
    for s in steps:
        if s["name"] in RENDER:
            body = RENDER[s["name"]](found[s["name"]]) if found[s["name"]] else [f"no result ({s['status']}; see {s['name']}.log)"]
            lines += ["", f"### {TITLES.get(s['name'], s['name'])}"] + (body if body[0] == "" else [""] + body)
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    work, out, mode = Path(argv[0]), Path(argv[1]), argv[2]
    steps = read_steps(work)
    found = {s["name"]: results(work, s["name"]) for s in steps}
    for s in steps:
        s["status"] = status(s, found[s["name"]])
    commit = (work / "commit").read_text().strip() if (work / "commit").is_file() else "unknown"
    env = environment()
    ok = all(s["status"] == "ok" for s in steps)
    (out / "summary.json").write_text(json.dumps(
        {"mode": mode, "ok": ok, "commit": commit, "environment": env, "steps": steps, "results": found}, indent=1))
    (out / "summary.md").write_text("\n".join(render(mode, commit, env, steps, found)) + "\n")
    print(f"gpu-check: {'all steps ok' if ok else 'FAILED: ' + ', '.join(s['name'] for s in steps if s['status'] != 'ok')}"
          f" ({out / 'summary.md'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
