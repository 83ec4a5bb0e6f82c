import pytest
import torch

import fastreg

# Every test that takes `device` runs on the CPU and, when a GPU and fastreg's CUDA kernels are
# present, on CUDA too (skipped cleanly otherwise).
DEVICES = ["cpu", "cuda"]


def cuda_ready() -> bool:
    return torch.cuda.is_available() and fastreg.has_cuda_kernels()


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not cuda_ready():
        pytest.skip("no CUDA device or fastreg built without CUDA kernels")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- property-based tests (hypothesis) ------------------------------------------------------------
# Two profiles: "ci" (the default, part of `make test`: derandomised, so the suite is reproducible,
# and bounded to a few minutes) and "fuzz" (`make fuzz`: random seeds, 20x the examples).
# Pick one with FASTREG_HYPOTHESIS_PROFILE=fuzz (what `make fuzz` sets). Each property test
# scales its own example count with `examples(n)` (n = its count in the CI profile).
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=_SLOW_OK)
settings.register_profile("fuzz", max_examples=2000, deadline=None, print_blob=True, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("FASTREG_HYPOTHESIS_PROFILE", "ci"))
class _Counts(collections.Counter):
    """Generated cases that ran to the end (all assertions passed), by kind; printed after the run
    and, if FASTREG_FUZZ_COUNTS_FILE is set, kept up to date there as JSON (for a run that is
    stopped before it ends)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        path = os.environ.get("FASTREG_FUZZ_COUNTS_FILE")
        if path:
            with open(path + ".tmp", "w") as f:
                json.dump(dict(self), f)
            os.replace(path + ".tmp", path)


FUZZ_COUNTS = _Counts()


def examples(n: int) -> settings:
    """settings(max_examples = n in the CI profile, scaled up in the fuzz profile)."""
    return settings(max_examples=max(1, n * settings.default.max_examples // 100))


def pytest_terminal_summary(terminalreporter):
    if FUZZ_COUNTS:
        terminalreporter.write_sep("-", f"generated cases that passed (max_examples {settings.default.max_examples})")
        for kind, n in sorted(FUZZ_COUNTS.items()):
            terminalreporter.write_line(f"{kind:>32}: {n}")


# ---- slow tests ------------------------------------------------------------------------------------
# @pytest.mark.slow tests (minutes, gigabytes: the > 2^31-element cases of test_reliability.py) are
# skipped unless selected: `pytest -m slow tests/test_reliability.py` (or FASTREG_RUN_SLOW=1).
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long or memory-hungry; run with -m slow or FASTREG_RUN_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("markexpr") or "") or os.environ.get("FASTREG_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with `pytest -m slow` or FASTREG_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
