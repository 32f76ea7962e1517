"""The sandbox's side of grading: run a notebook's cells, or launch a kernel, then answer the grader's calls.

Started by `exercises.protocol` inside the sandbox (`python -m exercises._child`, from the sandbox's runtime
folder); never imported by the grader. Nothing this process says is taken on trust: the grader reads back values
only (tensors, numbers, strings, tuples) and compares them in its own process. Two modes, from the first message:

- cells: the notebook's code cells run in a real IPython shell, as IPython runs them (magics included:
  `%%time` or `%%capture` run their body and keep its definitions); a cell's error is noted and the next cell
  runs. Then each request calls the notebook's function of that name on the grader's arguments, under the
  question's memory budget where it has one (exercises.budget). Where the graded questions depend on earlier
  ones (`Question.depends_on`), those names are stand-ins that ask the grader for the reference's result (a
  separate sandbox from the one grading those earlier questions).
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
            errors.append(f"code cell {i + 1}: {_error_text(error)}")
    return shell.user_ns, errors


_current_args: tuple = ()  # the arguments of the call being graded (a stand-in names its modules by them)


def _encode(value, depth: int = 0):
    """A stand-in's argument as data for the grader: tensors, numbers, strings, None, tuples; a module handed to
    the graded call (or one inside it, as `moe.gate`) as ("module", argument index, its name inside)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().as_subclass(torch.Tensor)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)) and depth < 3:
        return tuple(_encode(v, depth + 1) for v in value)
    if isinstance(value, torch.nn.Module):
        for i, arg in enumerate(_current_args):
            if isinstance(arg, torch.nn.Module):
                for path, module in arg.named_modules():
                    if module is value:
                        return ("module", i, path)
    raise TypeError(f"the stand-in takes tensors, numbers and the modules the graded call was handed, got a "
                    f"{type(value).__name__}")


def _alias(value, received: tuple, targets: tuple):
    """The reference's result, its tensors that were views of a mutated argument (a KV cache's filled part)
    made views of the learner's own tensors again."""
    if isinstance(value, (tuple, list)):
        return type(value)(_alias(v, received, targets) for v in value)
    if isinstance(value, torch.Tensor):
        for got, target in zip(received, targets):
            same = (isinstance(got, torch.Tensor) and got.untyped_storage().data_ptr() ==
                    value.untyped_storage().data_ptr() and got.is_contiguous() and target.is_contiguous()
                    and got.shape == target.shape and got.dtype == target.dtype)
            if same:
                offset = target.storage_offset() + value.storage_offset() - got.storage_offset()
                return target.as_strided(value.shape, value.stride(), offset)
    return value


def _stand_in(name: str, arg_names: tuple[str, ...], mutated: tuple[int, ...]):
    """`name` as grading calls it for a question that depends on it (`Question.depends_on`): the arguments go to
    the grader, which answers with the reference's result (and writes the mutated arguments back here)."""
    def stand_in(*args, **kwargs):
        args = list(args)
        for key in kwargs:
            if key not in arg_names[len(args):]:
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
        args += [kwargs[key] for key in arg_names[len(args):] if key in kwargs]
        if len(args) != len(arg_names):
            raise TypeError(f"{name}() takes {len(arg_names)} arguments ({', '.join(arg_names)}), got {len(args)}")
        wire.write(PROTO_OUT, {"event": "reference", "name": name, "args": tuple(_encode(a) for a in args)})
        answer = wire.read(PROTO_IN, trusted=True)
        if answer.get("error"):
            raise RuntimeError(f"{name} (a correct one, standing in for yours in grading) {answer['error']}")
        targets = tuple(args[i] for i in mutated)
        for target, value in zip(targets, answer["mutated"]):
            if isinstance(target, torch.Tensor):
                with torch.no_grad():
                    target.copy_(value)
        return _alias(answer["value"], answer["mutated"], targets)
    stand_in.__name__ = name
    return stand_in


def _call(fn, request: dict) -> dict:
    """Call fn on the request's arguments, within the question's memory budget (exercises.budget) if it has one;
    `out_of_memory` only chooses the grader's words for a failure, never a verdict."""
    global _current_args
    args = torch.load(io.BytesIO(request["args"]), weights_only=False)  # from the grader: trusted
    _current_args = args
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
        for name, (arg_names, mutated) in init.get("stand_ins", {}).items():
            namespace[name] = _stand_in(name, arg_names, mutated)  # the graded functions' globals
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
