"""These tests need the real verl package, which pins transformers<5.11 and so lives in its
own venv:

    scripts/setup-verl-venv.sh && .venv-verl/bin/pytest tests/integrations/verl

In the main venv (no verl) this folder collects nothing, so the main `pytest` run stays
green; CI runs the folder explicitly in the verl venv, where a broken verl install collects
nothing either and pytest exits 5 ("no tests ran"), failing that CI step loudly. In the verl
venv every test runs on the CPU, so a skipped test (a missing package, verl's v1 trainer not
importable) is reported as a failure, never as a skip."""

import importlib.util

import pytest

if importlib.util.find_spec("verl") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in the verl venv, where nothing may be skipped: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:  # a module-level importorskip
        report.outcome = "failed"
