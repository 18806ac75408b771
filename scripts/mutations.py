"""Apply single deliberate bugs to a temporary copy of the repo, one at a time, and run the tests
named for each: a mutation is killed when they fail. Prints one Markdown row per mutation.

    .venv/bin/python scripts/mutations.py                 # every mutation (about 20 minutes, CPU)
    .venv/bin/python scripts/mutations.py --list          # their names
    .venv/bin/python scripts/mutations.py trl-is-ratio one-sided-p

    .venv/bin/python scripts/mutations.py --check         # every pattern matches, every test file exists? (no tests run)

Each mutation replaces one exact piece of text, which must occur exactly once in its file, and
names test files that must exist: before any test runs, every selected mutation is checked, and
one whose text a refactor moved or changed, or whose test file was moved, stops the script (exit
2) naming the mutation and what is missing, so it is re-pointed rather than silently testing
nothing (tests/test_mutations_script.py runs `--check` in CI). The
copy is the working tree's tracked and untracked files; its src/ leads PYTHONPATH, so
subprocesses the tests start use it too. The verl mutations run in .venv-verl
(scripts/setup-verl-venv.sh) and are skipped without it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python")
PY_VERL = str(ROOT / ".venv-verl" / "bin" / "python")
NEW_BUILTIN = '''

@register_method("pg_is_doubled", params={})
class PgIsDoubled:  # a new built-in whose closed-form weight is wrong (2, autograd gives 1)
    @staticmethod
    def objective(logp, old_logp, adv):
        return ratio(logp, old_logp) * adv, torch.zeros_like(logp)

    @staticmethod
    def weight(logp, old_logp, adv):
        return torch.full_like(logp, 2.0)

    boundary = None
'''

# name: (file, text, replacement, tests (pytest args), python)
MUTATIONS: dict[str, tuple[str, str, str, list[str], str]] = {
    "trl-is-ratio": ("src/drpo/integrations/trl.py", "weights = (is_ratio > 0).to(logps.dtype)",
                     "weights = is_ratio.to(logps.dtype)",
                     ["tests/integrations/trl/test_integration_trl_dropin.py", "-k", "importance_sampling_modes"], PY),
    "trl-entropy-over-padding": (
        "src/drpo/integrations/trl.py", "entropy = (totals[0] / totals[1].clamp(min=1.0)).to(torch.float64)",
        "entropy = entropies.detach().double().mean()", ["tests/integrations/trl/test_integration_trl_dropin.py", "-k", "entropy"], PY),
    "one-sided-p": ("src/drpo/study/stats.py", "return TTest(mean, se, n, np.minimum(1.0, 2 * np.minimum(greater, less)), greater, less)",
                    "return TTest(mean, se, n, np.minimum(greater, less), greater, less)",
                    ["tests/study/test_study_claims.py", "tests/study/test_study_power.py"], PY),
    "no-adv-wrong-delta": ("src/drpo/study/claims.py", ' and p["delta"] == params["delta"]), None)', '), None)',
                           ["tests/study/test_study_claims.py"], PY),
    "threshold-two-deltas": ("src/drpo/study/claims.py", "if len(vs) >= 3:", "if len(vs) >= 2:",
                             ["tests/study/test_study_claims.py"], PY),
    "inspect-bucket-edge": ("src/drpo/inspect/analysis.py", "np.digitize(mu, BUCKET_EDGES, right=True)",
                            "np.digitize(mu, BUCKET_EDGES, right=False)", ["tests/inspect/test_inspect.py"], PY),
    "mismatch-bin-edge": ("src/drpo/train/mismatch.py", "sel = (mu > lo) & (mu <= hi)", "sel = (mu >= lo) & (mu < hi)",
                          ["tests/test_testbed.py", "-k", "by_hand or closed_on"], PY),
    "hash-seed": ("tests/integrations/verl/test_verl_callsite.py", 'seed=zlib.crc32(f"{method}/{agg}".encode()) % 1000',
                  "seed=hash((method, agg)) % 1000", ["tests/test_seeds_fixed.py"], PY),
    "no-fsync": ("src/drpo/files.py", "            os.fsync(f.fileno())\n", "            pass\n",
                 ["tests/test_durability.py"], PY),
    "no-dir-fsync": ("src/drpo/files.py", "        _fsync_dir(path.parent)\n", "        pass\n",
                     ["tests/test_durability.py"], PY),
    "no-append-fsync": ("src/drpo/files.py", "        os.fsync(fd)\n    except OSError as err:\n        os.ftruncate",
                        "        pass\n    except OSError as err:\n        os.ftruncate", ["tests/test_durability.py"], PY),
    # the main job (`drpo train`): what tests/train/test_main_job.py checks of a run through the CLI, and
    # the exit codes of failed runs (the faster tests that also see a missing file run first)
    "main-job-no-curves": ("src/drpo/train/loop.py", "    plot_curves(rows, out_dir / \"curves.png\"",
                           "    (lambda *a, **k: None)(rows, out_dir / \"curves.png\"",
                           ["tests/test_durability.py", "tests/train/test_main_job.py"], PY),
    "main-job-no-summary": ("src/drpo/train/loop.py",
                            '    atomic_write(out_dir / "summary.json", json.dumps(jsonable(summary, nonfinite=str), indent=2), '
                            '"summary")\n', "",
                            ["tests/test_durability.py", "tests/train/test_main_job.py"], PY),
    "main-job-exit-code": ("src/drpo/train/cli.py", "outputs in {args.out}\"\n    )\n    return 0",
                           "outputs in {args.out}\"\n    )\n    return 1", ["tests/train/test_main_job.py"], PY),
    "main-job-no-progress": ("src/drpo/train/cli.py", "progress=not args.no_progress,", "progress=False,",
                             ["tests/train/test_main_job.py"], PY),
    "cli-exit-0-on-config-error": ("src/drpo/train/cli.py",
                                   "    except (ConfigError, ValueError) as err:\n"
                                   "        print(f\"drpo train: {err}\", file=sys.stderr)\n        return 2\n",
                                   "    except (ConfigError, ValueError) as err:\n"
                                   "        print(f\"drpo train: {err}\", file=sys.stderr)\n        return 0\n",
                                   ["tests/train/test_config.py", "-k", "cli"], PY),
    "cli-exit-0-on-run-error": ("src/drpo/train/cli.py",
                                "        print(f\"drpo train: {err}\", file=sys.stderr)\n        return 2\n    print(\n",
                                "        print(f\"drpo train: {err}\", file=sys.stderr)\n        return 0\n    print(\n",
                                ["tests/train/test_config.py", "-k", "cli"], PY),
    "cli-exit-0-on-divergence": ("src/drpo/train/cli.py", "        return DIVERGED_EXIT\n", "        return 0\n",
                                 ["tests/train/test_train_faults.py", "-k", "overflowing"], PY),
    "resume-rng-lost": ("src/drpo/train/loop.py", '    state.generator.set_state(ckpt["generator"])\n', "",
                        ["tests/train/test_train_faults.py", "-k", "killed_compare"], PY),
    "dumps-redone-twice": ("src/drpo/train/loop.py", "        drop_steps_after(run.dumper.directory, state.step)\n",
                           "        pass\n", ["tests/train/test_train_faults.py", "-k", "dumps_each_step"], PY),
    "dump-not-atomic": ("src/drpo/dumps.py", "f = self._shard.enter_context(atomic_writer(self.path, \"dump\"))",
                        "f = self._shard.enter_context(open(self.path, \"wb\"))",
                        ["tests/test_durability.py", "tests/train/test_train_faults.py", "-k", "fsynced or dumps_each_step"],
                        PY),
    "jsonl-latin1": ("src/drpo/tasks/jsonl.py", "line = decode_utf8(raw, path, lineno)", "line = raw.decode()",
                     ["tests/tasks/test_tasks.py", "-k", "utf8"], PY),
    "registry-leak": ("tests/conftest.py", "    yield\n    registry._REGISTRY.clear()\n    registry._REGISTRY.update(saved)\n",
                      "    yield\n", ["tests/objectives/test_objectives_loss.py", "tests/inspect/test_inspect.py", "-k",
                                     "register or float64_reference_on_a_synthetic"], PY),
    "amplified-at-1": ("src/drpo/objectives/diagnostics.py", '"amplified": w > 1}', '"amplified": w >= 1}',
                       ["tests/objectives/test_objectives_loss.py", "tests/objectives/test_objectives_properties.py", "tests/inspect/test_inspect.py"],
                       PY),
    "new-builtin-wrong-weight": ("src/drpo/objectives/methods.py", "", NEW_BUILTIN,
                                 ["tests/objectives/test_objectives_gradients.py"], PY),
    "compare-exit-0-on-failure": ("src/drpo/study/cli_compare.py", "return 1 if outcome.failed else 0", "return 0",
                                  ["tests/study/test_study_compare.py", "-k", "exits_1"], PY),
    "inspect-responses": ("src/drpo/inspect/analysis.py", "acc.responses += int(np.unique(b.row[sel]).size)",
                          "acc.responses += int(sel.sum())", ["tests/inspect/test_inspect.py"], PY),
    "inspect-spread": ("src/drpo/inspect/analysis.py", "spread = (w.max(0).values - w.min(0).values).numpy()",
                       "spread = w.max(0).values.numpy()", ["tests/inspect/test_inspect.py"], PY),
    "inspect-std-err": ("src/drpo/inspect/analysis.py", '"std_err": math.sqrt(var / n) if n > 1',
                        '"std_err": math.sqrt(var / (n - 1)) if n > 1', ["tests/inspect/test_inspect.py"], PY),
    "inspect-positive-logp": ("src/drpo/dumps.py", "bad |= v > 1e-4  # a log-probability above 0",
                              "pass", ["tests/inspect/test_inspect.py"], PY),
    "inspect-sweep-first-value": ("src/drpo/inspect/analysis.py", "resolved = m.resolve_params(given)",
                                  "resolved = m.resolve_params({k: grid[k][0] for k in grid})",
                                  ["tests/inspect/test_inspect.py"], PY),
    "config-grad-accum": ("src/drpo/train/config.py", " or per_update % self.optim.grad_accum:", ":",
                          ["tests/train/test_config.py"], PY),
    "verl-clip-ratio-c-fallback": ("src/drpo/integrations/verl.py", "return _CLIP_RATIO_C_FALLBACK[method]",
                                   "return 3.0", ["tests/integrations/verl/test_verl_plugin.py", "-k", "clip_ratio_c_falls_back"],
                                   PY_VERL),
    "verl-rs-threshold": ("src/drpo/integrations/verl.py", 'rollout_rs_threshold=_get(rc, "rollout_rs_threshold"),',
                          'rollout_rs_threshold="0.5_2.0",',
                          ["tests/integrations/verl/test_verl_callsite.py", "-k", "configured_threshold"], PY_VERL),
    "verl-dppo-value": ("src/drpo/integrations/verl.py", '_LOG_PI_VALUE = ("dppo_tv", "dppo_kl")', "_LOG_PI_VALUE = ()",
                        ["tests/integrations/verl/test_verl_plugin.py", "-k", "loss_and_gradient_match"], PY_VERL),
}


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


OPTIONS_WITH_VALUE = ("-k", "-m", "-p")  # the pytest options the mutations pass a value to


def tested_paths(tests: list[str]) -> list[str]:
    """The files and folders among a mutation's pytest args (a node id's `::...` dropped)."""
    paths, after_option = [], False
    for arg in tests:
        if not after_option and not arg.startswith("-"):
            paths.append(arg.split("::", 1)[0])
        after_option = not after_option and arg in OPTIONS_WITH_VALUE
    return paths


def stale(name: str, root: Path = ROOT) -> str | None:
    """Why mutation `name` can no longer be applied to the tree at `root`, or its tests run there, or None."""
    path, text, _, tests, _ = MUTATIONS[name]
    f = root / path
    if not f.is_file():
        return f"mutation {name!r}: {path} does not exist (moved?); re-point it"
    if text != "":  # "" appends
        n = f.read_text().count(text)
        if n != 1:
            return f"mutation {name!r}: its text occurs {n} times in {path}, not once; re-point it: {text!r}"
    missing = [t for t in tested_paths(tests) if not (root / t).exists()]
    if missing:
        return f"mutation {name!r}: its tests {', '.join(missing)} do not exist (moved?); re-point them"
    return None


def apply(dest: Path, name: str) -> None:
    path, text, replacement, *_ = MUTATIONS[name]
    problem = stale(name, dest)
    if problem:
        raise SystemExit(problem)
    f = dest / path
    s = f.read_text()
    f.write_text(s + replacement if text == "" else s.replace(text, replacement))


def run_one(name: str) -> tuple[str, str, float]:
    tests, python = MUTATIONS[name][3:]
    if not Path(python).exists():
        return "skipped", f"{python} missing (scripts/setup-verl-venv.sh)", 0.0
    with tempfile.TemporaryDirectory(prefix=f"drpo-mut-{name}-") as tmp:
        dest = Path(tmp)
        copy_tree(dest)
        apply(dest, name)
        env = {**os.environ, "PYTHONPATH": str(dest / "src")}
        t0 = time.perf_counter()
        res = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=dest, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
    # a node id may hold spaces (parametrize ids); pytest ends the line with " - <message>" when it has one
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", res.stdout, re.M)
    if res.returncode == 0:
        return "SURVIVED", " ".join(tests), wall
    if res.returncode == 1 and failed:
        return "killed", failed[0], wall
    return f"error (exit {res.returncode})", res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "", wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--check", action="store_true", help="only check that each mutation's text is still in its file and its test files exist")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(MUTATIONS))
        return 0
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        p.error(f"unknown mutation(s): {', '.join(unknown)}")
    problems = [why for name in args.names or MUTATIONS if (why := stale(name))]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"all {len(args.names or MUTATIONS)} mutation(s) apply")
        return 0
    survived = 0
    print("| mutation | result | killed by | s |\n|---|---|---|---|", flush=True)
    for name in args.names or MUTATIONS:
        result, where, wall = run_one(name)
        survived += result == "SURVIVED"
        print(f"| {name} | {result} | {where} | {wall:.0f} |", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
