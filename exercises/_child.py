"""The sandbox's side of grading: run a notebook's cells, or launch a kernel, then answer the grader's calls.

Started by `exercises.protocol` inside the sandbox (`python -m exercises._child`, from the sandbox's runtime
folder); never imported by the grader. Nothing this process says is taken on trust: the grader reads back values
only (tensors, numbers, strings, tuples) and compares them in its own process. Two modes, from the first message:

- cells: the notebook's code cells run in a real IPython shell, as IPython runs them (magics included:
  `%%time` or `%%capture` run their body and keep its definitions); a cell's error is noted and the next cell
  runs. Then each request calls the notebook's function of that name on the grader's arguments, under the
  question's memory budget where it has one (exercises.budget).
- kernel: no notebook code runs. Each request launches the kernel source the grader checked and compiled
  (exercises.static_check, exercises.kernel_compile) through the contract's launcher (exercises.contracts),
  under Triton's interpreter.

Requests come on stdin, replies go out on the original stdout; the notebook's own prints go to /dev/null.
"""

from __future__ import annotations

import io
import os
import sys
import types

PROTO_IN, PROTO_OUT = os.dup(0), os.dup(1)  # before anything can print
_null = os.open(os.devnull, os.O_RDWR)
os.dup2(_null, 0)
os.dup2(_null, 1)

import torch  # noqa: E402

from exercises import wire  # noqa: E402
from exercises.budget import memory_budget, out_of_memory  # noqa: E402


class _Otter(types.ModuleType):
    """A stand-in for `otter` so a submission's `grader.check(...)` cells run (they are no part of grading)."""

    class Notebook:
        def __init__(self, *args, **kwargs):
            pass

        def check(self, *args, **kwargs):
            return None

        check_all = export = to_pdf = check


def _stand_ins() -> None:
    """`import otter` and `from exercises.feedback import check, notebook_file` work, and do nothing."""
    sys.modules["otter"] = _Otter("otter")
    feedback = types.ModuleType("exercises.feedback")
    feedback.check = lambda *args, **kwargs: None
    feedback.notebook_file = lambda assignment, *args, **kwargs: f"{assignment}.ipynb"
    sys.modules["exercises.feedback"] = feedback


def _plain(value, depth: int = 0):
    """What can travel back: plain tensors, numbers, strings, None, tuples; anything else as a description."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().as_subclass(torch.Tensor).clone()
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value[:200]
    if isinstance(value, (tuple, list)) and depth < 3:
        return tuple(_plain(v, depth + 1) for v in value)
    return f"<a {type(value).__name__} object>"[:200]


def _error_type(error: BaseException) -> str:
    return type(error).__name__[:80]


def _error_text(error: BaseException) -> str:
    text = f"{_error_type(error)}: {error}"
    return text if len(text) <= 500 else text[:500] + " ..."


def _shell():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.user_ns["display"] = lambda *args, **kwargs: None
    return shell


def _run_cells(cells: list[str], skip: set[int]) -> tuple[dict, list[str]]:
    shell = _shell()
    errors = []
    for i, source in enumerate(cells):
        if i in skip:
            continue
        wire.write(PROTO_OUT, {"event": "cell", "index": i})
        result = shell.run_cell(source, store_history=False, silent=False)
        error = result.error_before_exec or result.error_in_exec
        if error is not None:
            errors.append(f"cell {i + 1}: {_error_text(error)}")
    return shell.user_ns, errors


def _call(fn, request: dict) -> dict:
    """Call fn on the request's arguments, within the question's memory budget (exercises.budget) if it has one;
    `out_of_memory` only chooses the grader's words for a failure, never a verdict."""
    args = torch.load(io.BytesIO(request["args"]), weights_only=False)  # from the grader: trusted
    result, error, error_type, oom = None, None, None, False
    try:
        with memory_budget(request.get("memory_mb")):
            result = fn(*args)
    except BaseException as e:  # an answer's SystemExit or KeyboardInterrupt fails this case only
        error, error_type, oom = _error_text(e), _error_type(e), out_of_memory(e)
    return {"value": _plain(result), "mutated": tuple(_plain(args[i]) for i in request["mutated"]),
            "error": error, "error_type": error_type, "out_of_memory": oom}


def _cells_function(namespace: dict, name: str):
    fn = namespace.get(name)
    if fn is None:
        return f"{name} is not defined: the notebook has no function of that name"
    if not callable(fn):
        return f"{name} is not a function but {type(fn).__name__}"
    return fn


def _kernel_function(kernels: dict, name: str):
    import triton

    from exercises.contracts import CONTRACTS, define_kernel

    contract = CONTRACTS[name]
    kernel = triton.jit(define_kernel(kernels[name], contract.kernel, f"<kernel {contract.kernel}>"))
    return lambda *args: contract.launch(kernel, *args)


def _serve() -> None:
    init = wire.read(PROTO_IN, trusted=True)
    _stand_ins()
    if init["mode"] == "cells":
        namespace, errors = _run_cells(init["cells"], set(init["skip"]))
        functions: dict = {}
    else:
        kernels, errors, functions = init["kernels"], [], {}
    wire.write(PROTO_OUT, {"event": "loaded", "errors": errors})
    while True:
        try:
            request = wire.read(PROTO_IN, trusted=True)
        except wire.Closed:
            break
        name = request["name"]
        if init["mode"] == "cells":
            fn = functions.setdefault(name, _cells_function(namespace, name))
        else:
            try:
                fn = _kernel_function(kernels, name)
            except BaseException as error:
                fn = f"the kernel could not be defined: {_error_text(error)}"
        reply = {"error": fn, "error_type": "missing"} if isinstance(fn, str) else _call(fn, request)
        wire.write(PROTO_OUT, reply)
    os._exit(0)  # skip the submission's exit handlers


if __name__ == "__main__":
    _serve()
