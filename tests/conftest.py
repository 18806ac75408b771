"""Test-suite markers that live with the tests (the rest are in pyproject.toml), the Hypothesis
profile, and the method registry restored after each test."""

import os

import pytest
import torch

try:
    from hypothesis import settings
except ImportError:  # the verl venv runs tests/integrations/verl without Hypothesis
    settings = None

if settings is not None:
    # "ci", the default: a fixed seed per test (derandomize) and no example database carried
    # between runs, so every run draws the same examples and a failure reproduces anywhere.
    # HYPOTHESIS_PROFILE=explore draws new examples each run (a local hunt for failures).
    settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _method_registry_restored():
    """A method a test registers is gone after it: tests that iterate the registry (drpo
    inspect's default variants, every-method checks) see the built-ins whatever ran before."""
    from drpo.objectives import registry

    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run with `pytest -m cuda`")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
