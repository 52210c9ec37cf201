"""Test set-up: Triton kernels run under its interpreter when there is no GPU (set before any import),
``gpu`` tests skip without one, and every test draws its random inputs from a seed derived from its id.

Seeds: ``crc32(test id)`` by default — stable across runs and machines, so a failure replays as it is —
and printed in the report of a failing test. ``--fresh-seeds`` draws new ones for soak runs (printed the
same way); ``GIG_FAST_TEST_SEED=N`` replays one seed for every selected test.
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SEED_ENV = "GIG_FAST_TEST_SEED"


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests — marked so, or parametrised with ``device="cuda"`` — skip cleanly where no GPU is
    visible; ``-m gpu`` selects them on a GPU box (benchmarks/gpu_campaign.sh)."""
    for item in items:
        if getattr(item, "callspec", None) is not None and item.callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.gpu)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not any(m.name == "skip" for m in item.iter_markers()):
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption("--fresh-seeds", action="store_true",
                     help="draw a new random seed for every test (soak runs); failures print theirs")


def seed_for(nodeid: str, fresh: bool = False) -> int:
    """The seed of a test: ``GIG_FAST_TEST_SEED`` if set, else a fresh one or ``crc32(nodeid)``."""
    if os.environ.get(SEED_ENV):
        return int(os.environ[SEED_ENV])
    if fresh:
        return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    return zlib.crc32(nodeid.encode("utf-8")) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def _seeded(request):
    """Seed torch (and numpy's legacy global generator) from the test id; remembered for the report."""
    seed = seed_for(request.node.nodeid, request.config.getoption("--fresh-seeds"))
    torch.manual_seed(seed)
    import numpy as np
    np.random.seed(seed)
    request.node.gig_seed = seed
    request.node.user_properties.append(("seed", seed))  # also in junit XML reports
    yield


@pytest.fixture
def seed(request) -> int:
    """This test's seed (see the module docstring), for tests that build their own generators."""
    return request.node.gig_seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "gig_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"seed {seed}: replay with {SEED_ENV}={seed} python -m pytest "
                                               f"'{item.nodeid}'"))
