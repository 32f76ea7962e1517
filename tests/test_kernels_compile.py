"""Every kernel compiles for sm_90 (H100, H200) and sm_80 (A100) on this CPU machine (`triton.compile` with a
GPUTarget; ptxas from the triton wheel) in the configurations the wrappers pick for each target's shared
memory, compiled as a launch on aligned tensors is (16-byte-aligned pointers, sizes multiples of 16: the
loads pipelined, with their buffers), and the shared memory the compiler reports is within the target's
limit per block and not above the wrapper's estimate (which is what the wrappers pick by). One subprocess
per target with TRITON_INTERPRET=0 and an empty Triton cache compiles them: CI's selection
(`dskernels.compile_check.ci_selection`), or every configuration with DSKERNELS_COMPILE_ALL=1.
Nothing runs on a device here: the kernels are only compiled for one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dskernels import compile_check

ROOT = Path(__file__).resolve().parents[1]
ALL = os.environ.get("DSKERNELS_COMPILE_ALL", "0") not in ("", "0")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """One subprocess per target, run side by side; their rows by (target, config name)."""
    folder = tmp_path_factory.mktemp("compile")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(folder / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    runs = {}
    for target in compile_check.TARGETS:
        command = [sys.executable, "-m", "dskernels.compile_check", "--target", target,
                   "--json", str(folder / f"{target}.json")] + (["--all"] if ALL else [])
        runs[target] = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
    rows = {}
    for target, process in runs.items():
        _, stderr = process.communicate(timeout=1800)
        assert process.returncode == 0, stderr[-4000:]
        rows.update({(row["target"], row["name"]): row
                     for row in json.loads((folder / f"{target}.json").read_text())})
    return rows


def _cases():
    for target in compile_check.TARGETS:
        for family in compile_check.FAMILIES:
            for dtype in compile_check.DTYPES:
                chosen = (compile_check.configs(target, family, dtype) if ALL
                          else compile_check.ci_selection(target, family, dtype))
                yield from ((target, c.name) for c in chosen)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("target, name", list(_cases()))
def test_config_compiles_within_shared_memory(compiled, target, name):
    row = compiled[target, name]
    assert row["aligned"], row  # compiled as a launch on aligned tensors: the loads pipelined
    assert not compile_check.problems(row), row


def test_check_refuses_an_estimate_or_limit_below_the_compiled_size(compiled):
    # a compiled config that really keeps pipelined buffers, fed a wrong estimate, then a smaller limit
    row = max(compiled.values(), key=lambda r: r["shared"])
    assert row["shared"] > 0 and not compile_check.problems(row)
    assert "above the wrapper's estimate" in compile_check.problems({**row, "estimate": row["shared"] - 1})[0]
    assert "above the target's limit" in compile_check.problems({**row, "limit": row["shared"] - 1})[0]


def test_every_family_target_and_dtype_is_covered():
    # each target x dtype, each family, and in float16 / bfloat16 each kernel of the package
    kernels = {f for f in compile_check.FAMILIES for c in compile_check.configs("sm_90", f, torch.float16)}
    for target in compile_check.TARGETS:
        for dtype in compile_check.DTYPES:
            for family in compile_check.FAMILIES:
                assert compile_check.ci_selection(target, family, dtype), (target, family, dtype)
        half = [c for f in compile_check.FAMILIES for c in compile_check.ci_selection(target, f, torch.float16)]
        every = {c.kernel.fn for f in compile_check.FAMILIES for c in compile_check.configs(target, f, torch.float16)}
        assert {c.kernel.fn for c in half} == every and kernels


def test_selection_takes_the_largest_estimate():
    for dtype in (torch.float16, torch.bfloat16):
        for chosen in compile_check.ci_selection("sm_90", "mla_decode", dtype):
            same_kernel = [c for c in compile_check.configs("sm_90", "mla_decode", dtype)
                           if c.kernel.fn is chosen.kernel.fn]
            assert (chosen.estimate or 0) == max(c.estimate or 0 for c in same_kernel)
