"""Repository-wide pytest setup.

Triton decides between compiled and interpreted kernels when a kernel is *defined*, so the interpreter switch
must be set before any kernel module is imported, and before nbval starts notebook kernels (they inherit it).
"""

import os
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --- Time limits for notebooks (lessons, exercise sources) -----------------------------------------------
# nbval turns each notebook into one test item per cell; the kernel starts in the first cell's setup and stops
# in the last cell's teardown. A notebook's time is the wall time from its first cell's setup to its last
# cell's teardown. Over `notebook_time_limit` its last cell errors, naming the time; over
# `notebooks_total_time_limit` for all notebooks together the run fails (exit status 1). The limits are ini
# options (set in pyproject.toml) so that tests/test_notebook_limits.py can exercise them with small values.
_notebook_started: dict[Path, float] = {}
_notebook_seconds: dict[Path, float] = {}


def pytest_addoption(parser):
    parser.addini("notebook_time_limit", "seconds one notebook may take (nbval)", default="120")
    parser.addini("notebooks_total_time_limit", "seconds all notebooks together may take (nbval)",
                  default="720")


def _notebook_of(item) -> Path | None:
    path = Path(str(item.fspath))
    return path if path.suffix == ".ipynb" else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    notebook = _notebook_of(item)
    if notebook is not None:
        _notebook_started.setdefault(notebook, time.perf_counter())


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    notebook = _notebook_of(item)
    if notebook is None or (nextitem is not None and _notebook_of(nextitem) == notebook):
        return  # not a notebook, or not its last cell
    seconds = time.perf_counter() - _notebook_started[notebook]
    _notebook_seconds[notebook] = seconds
    limit = float(item.config.getini("notebook_time_limit"))
    if seconds > limit:
        pytest.fail(f"{notebook.name} took {seconds:.0f} s, over the limit of {limit:.0f} s per notebook "
                    f"(notebook_time_limit)", pytrace=False)


def _total_over_limit(config) -> tuple[float, float] | None:
    total, limit = sum(_notebook_seconds.values()), float(config.getini("notebooks_total_time_limit"))
    return (total, limit) if total > limit else None


def pytest_sessionfinish(session):
    if _total_over_limit(session.config) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    if not _notebook_seconds:
        return
    terminalreporter.section("notebook times (wall, kernel start to stop)")
    for notebook, seconds in sorted(_notebook_seconds.items()):
        terminalreporter.write_line(f"{seconds:7.1f} s  {notebook.parent.name}/{notebook.name}")
    total = sum(_notebook_seconds.values())
    terminalreporter.write_line(f"{total:7.1f} s  all {len(_notebook_seconds)} notebooks")
    over = _total_over_limit(config)
    if over:
        terminalreporter.write_line(f"FAILED: all notebooks together took {over[0]:.0f} s, over the limit of "
                                    f"{over[1]:.0f} s (notebooks_total_time_limit)", red=True)


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests make every tensor they pass to a kernel on: the GPU when there is one (kernels
    compiled), else the CPU (kernels under Triton's interpreter). Tests write `device=device` on each factory
    (or `.to(device)`), which `tests/test_device_lint.py` checks statically."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
