"""Every command the README and docs/*.md show runs as written: each `drpo ...`, `python
benchmarks/...`, `python examples/...` and `python -m drpo...` line of a fenced code block (and
the README's inline benchmark and example commands) is run as a subprocess from a copy of the
repo root's layout, exactly as written apart from size flags the command already accepts
(appended, so they win), and must exit 0 with its last line in the documented form.

A command this file does not know fails `test_every_documented_command_is_listed`, naming it:
add it to COMMANDS (how to run it small, the last line it must print) or to NOT_RUN (why CI
cannot run it). Relative outputs (runs/, results/, report/, weights.png) land in a temporary
directory whose configs/, examples/ and benchmarks/ link to the repo's, whose docs/img/ is its
own, and where absolute /tmp/ paths of the docs are mapped."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(\.venv/bin/)?(drpo (train|mismatch|compare|report|inspect|weights)( |$)|python3? (-m drpo|benchmarks/|examples/))"
                     r"|^DRY_RUN=1 bash examples/")
INLINE = re.compile(r"^(\.venv/bin/)?python (benchmarks|examples)/")

# the tiny policy, trained and evaluated on a few problems, a 10-step warm start
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "warmstart.steps=10", "warmstart.batch_size=16", "warmstart.check_size=16", "warmstart.on_miss=continue",
        "task.eval_size=8", "rollout.prompts_per_step=2", "rollout.n_samples=2", "rollout.max_new_tokens=4",
        "train.steps=2", "train.eval_every=2", "train.save_every=1", "train.threads=1"]
SMOL = ["task.eval_size=2", "rollout.prompts_per_step=1", "rollout.n_samples=2", "rollout.max_new_tokens=3",
        "train.steps=1", "train.eval_every=1", "train.threads=1"]


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


TRAIN_DONE = r"done: \d+ steps, eval accuracy \S+ \(warm start\) -> \S+ \(final\), best \S+; \d+ s; outputs in \S+"
# command as written -> (size flags appended, regex of the last line). Run in this order (a
# resume after its run, inspect and report after what they read).
COMMANDS = {
    "drpo train --config configs/default.yaml --out runs/default": (sets(TINY), TRAIN_DONE),
    "drpo train --config configs/default.yaml --out runs/default --resume": (sets(TINY), TRAIN_DONE),
    "drpo train --config configs/default.yaml --set objective.method=grpo --set rollout.precision=bf16 --out runs/grpo-bf16":
        (sets(TINY), TRAIN_DONE),
    "drpo train --config configs/default.yaml --set objective.params.delta=0.15 --set rollout.sync_every=4 --out runs/stale":
        (sets(TINY), TRAIN_DONE),
    "drpo train --config configs/default.yaml --set task.name=jsonl --set task.dataset=problems.jsonl --out runs/jsonl":
        (sets(TINY), TRAIN_DONE),
    "drpo train --config configs/short.yaml --set warmstart.cache_dir=/tmp/finalcache0 --out /tmp/short0 --no-progress":
        (sets(TINY), TRAIN_DONE),
    "drpo train --config configs/smollm2.yaml --out runs/smollm2": (sets(SMOL), TRAIN_DONE),
    "drpo train --config configs/smollm2.yaml --set objective.method=grpo --set rollout.precision=bf16 --out runs/smollm2-grpo":
        (sets(SMOL), TRAIN_DONE),
    "drpo train --config configs/smollm2.yaml --out /tmp/t11/smol --no-progress": (sets(SMOL), TRAIN_DONE),
    "drpo train --config configs/smollm2.yaml --set seed=0 --set train.steps=3 --set dump.every=1 --set "
    "rollout.precision=bf16 --set rollout.prompts_per_step=8 --set train.eval_every=100 --set train.save_every=100 "
    "--set train.save_final=false --out runs/smol-dump-s0": (sets(SMOL), TRAIN_DONE),
    "drpo inspect runs/smol-dump-s0/dumps --out runs/smol-dump-s0/inspect --param drpo.delta=0.05,0.15,1,12.5":
        ([], r"report: \S+report\.md \(report\.html, report\.json\)"),
    "drpo inspect DUMP_DIR --out report/ --param drpo.delta=0.05,0.15,1,12.5":
        ([], r"report: \S+report\.md \(report\.html, report\.json\)"),
    "drpo compare --preset quick --out results/quick": (["--seeds", "1", *sets(TINY)],
                                                       r"drpo compare: report written to \S+ and \S+"),
    "drpo compare --preset quick": (["--seeds", "1", *sets(TINY)], r"drpo compare: report written to \S+ and \S+"),
    # drpo report lists what it wrote, one `NAME  PATH` line each, the figures last
    "drpo report results/paper-mini --out report/": ([], r"figure:\w+\s+\S+\.png"),
    "drpo report results/paper-mini": ([], r"figure:\w+\s+\S+\.png"),
    ".venv/bin/python examples/plain_pytorch_step.py":
        ([], re.escape("loss=0.0215 weight in [0.9998, 1.0000] mismatch |log r|=0.0169 kept_grad_mass=1.000")),
    ".venv/bin/python examples/trl/train_drpo_trl.py --steps 20 --out runs/trl-drpo":
        (["--steps", "1", "--prompts-per-step", "2", "--num-generations", "2"], r".+"),
    ".venv/bin/python examples/trl/train_drpo_trl.py --method dppo_tv --params '{\"delta_high\": 0.2}'":
        (["--steps", "1", "--prompts-per-step", "2", "--num-generations", "2"], r".+"),
    ".venv/bin/python benchmarks/objectives.py": (["--tokens", "4096", "--repeats", "1"],
                                                  r"objectives: drpo_time_vs_grpo=\S+ drpo_memory_vs_grpo=\S+"),
    ".venv/bin/python benchmarks/logprobs.py": (["--tokens", "96", "--vocab", "300", "--hidden", "16", "--repeats", "1"],
                                                r"logprobs: memory_vs_naive=\S+ time_vs_naive=\S+ memory_vs_trl=\S+ "
                                                r"time_vs_trl=\S+ memory_vs_liger=\S+ time_vs_liger=\S+"),
    ".venv/bin/python benchmarks/trainer.py --threads 1": (
        ["--steps", "1", "--warmup", "0", "--prompts", "2", "--group", "2", "--max-new-tokens", "3", "--no-warmstart"],
        r"trainer: steps_per_s_vs_trl=\S+ tokens_per_s_vs_trl=\S+"),
    ".venv/bin/python benchmarks/trainer.py": (
        ["--steps", "1", "--warmup", "0", "--prompts", "2", "--group", "2", "--max-new-tokens", "3", "--no-warmstart",
         "--threads", "1"], r"trainer: steps_per_s_vs_trl=\S+ tokens_per_s_vs_trl=\S+"),
    ".venv/bin/python benchmarks/inspector.py": (["--tokens", "20000", "--dir", "bench-inspect"], r"PASS"),
    "drpo mismatch --config configs/testbed.yaml --precisions fp32,bf16,fp8_e4m3,fp8_e5m2,fp8_e2e --prompts 64 "
    "--threads 1": (
        ["--prompts", "2", "--n-samples", "1", "--max-new-tokens", "4", "--set", "warmstart.steps=10",
         "--set", "warmstart.on_miss=continue"], r"fp8_e2e\s.+"),
}
NOT_RUN = {
    "drpo compare --preset paper-mini --out results/paper-mini":
        "90 runs on the testbed, about an hour with 2 workers (docs/study.md#cost); the same code path runs here as "
        "`drpo compare --preset quick`, whose results `drpo report results/paper-mini` reads",
    "drpo compare --preset paper-mini --workers 2": "as `drpo compare --preset paper-mini --out results/paper-mini`",
    "drpo compare [--preset quick|paper-mini | --grid FILE.yaml] [--out DIR]": "a usage synopsis, not a command",
    "drpo compare --preset fp8-threshold --workers 2 --out results/fp8-threshold":
        "50 runs on the testbed, 74 min with 2 workers (docs/stress.md); the same code path as `--preset quick`",
    "drpo compare --preset stress --workers 2 --out results/stress":
        "140 runs on the testbed, 97 min with 2 workers (docs/stress.md); the same code path as `--preset quick`",
    "drpo report results/fp8-threshold --out docs/results/fp8-threshold":
        "reads the 50-run study and rewrites the committed report; the same code path as `drpo report results/paper-mini`",
    "drpo report results/stress --out docs/results/stress":
        "reads the 140-run study and rewrites the committed report; the same code path as `drpo report results/paper-mini`",
    ".venv/bin/python benchmarks/objectives.py --device cuda": "needs a CUDA GPU",
    "DRY_RUN=1 bash examples/verl/run_drpo_qwen3_4b_dapo_math.sh":
        "needs verl (its own venv): tests/integrations/verl/test_verl_plugin.py runs it there",
    "drpo train --out R $S --resume &": "a shell sketch ($S, a run killed earlier); tests/train/test_train_faults.py runs "
                                        "the second --resume on a live run",
    "drpo train --out R $S --resume": "as `drpo train --out R $S --resume &`",
}
ORDER = list(COMMANDS)


def code_block_commands(text: str) -> list[str]:
    """Command lines of bash (or unlabelled) fenced blocks, continuations joined, comments and
    `$ ` prompts dropped; plus inline `python benchmarks/...` / `python examples/...` spans."""
    out, block, lang = [], None, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if block is None:
                block, lang = [], line.strip()[3:]
            else:
                if lang in ("", "bash", "sh", "console"):
                    joined = re.sub(r"\\\n\s*", "", "\n".join(block))
                    for cmd in joined.splitlines():
                        cmd = re.sub(r"\s+#.*$", "", cmd.strip())
                        cmd = cmd[2:] if cmd.startswith("$ ") else cmd
                        if COMMAND.match(cmd):
                            out.append(cmd)
                block = None
            continue
        if block is not None:
            block.append(line)
    out += [m for m in re.findall(r"`([^`\n]+)`", text) if INLINE.match(m)]
    return list(dict.fromkeys(out))


def documented() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for cmd in code_block_commands(doc.read_text()):
            found.setdefault(cmd, []).append(doc.name)
    return found


def test_every_documented_command_is_listed():
    unknown = {cmd: where for cmd, where in documented().items() if cmd not in COMMANDS and cmd not in NOT_RUN}
    assert not unknown, ("documented commands this test does not run nor list with a reason (add each to "
                         f"COMMANDS or NOT_RUN in {Path(__file__).name}): {json.dumps(unknown, indent=1)}")
    stale = sorted((set(COMMANDS) | set(NOT_RUN)) - set(documented()))
    assert not stale, f"listed but no longer documented: {stale}"


def test_the_extraction_sees_blocks_continuations_and_inline_commands():
    text = ("```bash\ndrpo train --config a.yaml \\\n  --out r   # a comment\n$ drpo inspect d --out x\n```\n"
            "```\ndrpo inspect: an error line\n```\nrun `.venv/bin/python benchmarks/x.py --n 1` or `drpo weights`\n"
            "```python\nimport drpo\n```\n")
    assert code_block_commands(text) == ["drpo train --config a.yaml --out r", "drpo inspect d --out x",
                                         ".venv/bin/python benchmarks/x.py --n 1"]


# The commands run in the docs' order in one sandbox, as a user runs them one after another: a
# `--resume` continues the run before it, `drpo inspect` reads the dumps written before it, `drpo
# report` the study run before it. So this module keeps its order when `make test` shuffles the rest.
pytestmark = pytest.mark.random_order(disabled=True)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    box = tmp_path_factory.mktemp("docs-commands")
    for name in ("configs", "examples", "benchmarks"):
        (box / name).symlink_to(ROOT / name)
    (box / ".venv").symlink_to(Path(sys.executable).parents[1])
    (box / "docs" / "img").mkdir(parents=True)
    lines = [json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) for a in range(1, 7) for b in range(1, 5)]
    (box / "problems.jsonl").write_text("\n".join(lines) + "\n")
    return box


def run(cmd: str, sandbox: Path, extra: list[str]) -> subprocess.CompletedProcess:
    argv = [a.replace("/tmp/", f"{sandbox}/tmp/") for a in shlex.split(cmd)] + extra
    if argv[0] == "drpo":
        argv[0] = str(Path(sys.executable).with_name("drpo"))
    env = {**os.environ, "DRPO_CACHE": str(sandbox / "cache"), "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    return subprocess.run(argv, cwd=sandbox, capture_output=True, text=True, env=env, timeout=900)


def last_line(res: subprocess.CompletedProcess) -> str:
    """The command's last line: of what it printed on stdout, or on stderr where it prints only there."""
    lines = [ln for ln in (res.stdout or res.stderr).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


@pytest.mark.slow
@pytest.mark.parametrize("cmd", ORDER, ids=[c[:80] for c in ORDER])
def test_documented_command_runs_as_written(cmd, sandbox):
    if cmd.startswith("drpo report results/paper-mini"):  # reads the quick study's results
        target = sandbox / "results" / "paper-mini"
        if not target.exists():
            target.symlink_to(sandbox / "results" / "quick")
    if "DUMP_DIR" in cmd:
        cmd = cmd.replace("DUMP_DIR", "runs/smol-dump-s0/dumps")
    extra, pattern = COMMANDS[cmd if "runs/smol-dump-s0/dumps --out report/" not in cmd
                              else cmd.replace("runs/smol-dump-s0/dumps", "DUMP_DIR")]
    res = run(cmd, sandbox, extra)
    assert res.returncode == 0, f"{cmd}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert re.fullmatch(pattern, last_line(res)), f"{cmd}: last line {last_line(res)!r}"
