"""The learner's check, in the notebook: run one exercise's visible cases now and say what is wrong.

`check("causal_sdpa", causal_sdpa)` calls the function on each visible case, compares with refimpl's answer and
raises AssertionError on the first failure with one plain sentence: the verdict and the case (the function and
its inputs' shapes), then what is wrong (shape, dtype, the first wrong value), then, where the answer equals the
reference computed with a common mistake (`Question.mistakes`), which mistake. It returns None when every case
passes. otter's `grader.check(...)` cells in the student notebooks call it. Grading runs the same cases and more
(hidden ones), elsewhere.

`notebook_file("02_rope")`, in the released notebook's first cell, finds the notebook file otter reads the checks
from, whatever it is called (a second download is `02_rope (1).ipynb`).

A Triton exercise gets its inputs on the GPU when there is one and the interpreter is off (a compiled kernel
refuses CPU tensors); its answer is brought back to the CPU, where the expected one is computed.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from exercises import guard
from exercises.budget import memory_budget, out_of_memory, over_budget
from exercises.compare import describe, mismatch
from exercises.contracts import CONTRACTS
from exercises.questions import EXERCISES, QUESTIONS, Question, clone


def _otter_tests(path: Path) -> set[str]:
    """The question names whose checks otter stored in the notebook's metadata (empty where it has none)."""
    try:
        tests = json.loads(path.read_text(encoding="utf-8"))["metadata"]["otter"]["tests"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return set(tests) if isinstance(tests, dict) else set()


def notebook_file(assignment: str) -> str:
    """The path of this assignment's notebook, for `otter.Notebook(...)`, which reads the checks from the
    file's metadata: the notebook the kernel was started for (Jupyter's `JPY_SESSION_NAME`), else
    `ASSIGNMENT.ipynb` in the working folder, else any notebook there holding this assignment's checks (a renamed
    download such as `02_rope (1).ipynb`), names starting with the assignment's first. Raises FileNotFoundError
    naming the folder when there is none."""
    wanted = set(EXERCISES[assignment].questions) if assignment in EXERCISES else set()
    session = os.environ.get("JPY_SESSION_NAME", "")
    here = sorted(Path.cwd().glob("*.ipynb"), key=lambda p: (not p.name.startswith(assignment), p.name))
    candidates = ([Path(session)] if session.endswith(".ipynb") else []) + [Path(f"{assignment}.ipynb")] + here
    for path in candidates:
        if path.is_file() and (tests := _otter_tests(path)) and tests <= wanted:
            return str(path)
    raise FileNotFoundError(f"no notebook of {assignment} in {Path.cwd().name}/: grader.check reads its checks "
                            f"from the notebook file; open and save the notebook in that folder")


def check(name: str, fn) -> None:
    question = QUESTIONS[name]
    if not callable(fn):
        raise AssertionError(f"{name} should be a function, got {describe(fn)}")
    if question.triton:
        _check_contract(name, fn)
    canon = question.canonical or (lambda x: x)
    align = question.align or (lambda answer, expected: (canon(answer), canon(expected)))
    launches = guard.triton_launches() if question.triton else [1]
    device = kernel_device() if question.triton else "cpu"
    for label, args in question.cases(None):
        expected, expected_mutated = question.expected(args)
        given = to_device(clone(args), device)
        inputs = ", ".join(f"{n}={describe(a)}" for n, a in zip(question.arg_names, args))
        where = f"{name} fails the {label} case, {name}({inputs})"
        if question.triton:
            launches[0] = 0
        with guard.watching(question.forbidden) as forbidden:
            try:
                with memory_budget(question.memory_budget_mb):
                    result = fn(*given)
            except guard.ForbiddenCall:
                result = None
            except NotImplementedError:
                raise AssertionError(f"{name} is not written yet: replace `raise NotImplementedError` with "
                                     "your code") from None
            except Exception as error:
                raise AssertionError(f"{where}: {_raised(question, error)}{_learner_line(error)}"
                                     f"{_earlier_functions(question, fn)}") from None
        if forbidden:
            raise AssertionError(f"{where}: {guard.message(forbidden[0])}")
        if not launches[0]:
            raise AssertionError(f"{where}: launched no Triton kernel; the exercise is to write one")
        result, given = to_device(result, "cpu"), to_device(given, "cpu")
        problem = mismatch(*align(result, expected), "the result", question.atol, question.rtol)
        for i, want in zip(question.mutated_args, expected_mutated):
            problem = problem or mismatch(given[i], want, f"{question.arg_names[i]} after the call",
                                          question.atol, question.rtol)
        if problem:
            raise AssertionError(f"{where}: {problem}{mistake_hint(question, args, result)}"
                                 f"{_earlier_functions(question, fn)}")


def mistake_hint(question: Question, args: tuple, result) -> str:
    """'; this is the answer you get if you ...' when `result` equals the reference computed with one of the
    question's common mistakes, else ''."""
    canon = question.canonical or (lambda x: x)
    for what, wrong_reference in question.mistakes:
        try:
            with memory_budget(question.memory_budget_mb):  # a naive mistake is refused at once on a large case
                wrong = wrong_reference(*clone(args))
        except Exception:  # a mistake that does not apply to this case's sizes
            continue
        if mismatch(canon(result), canon(wrong), "", question.atol, question.rtol) is None:
            return f"; this is the answer you get if you {what}"
    return ""


LIBRARY = tuple(str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, Path(__file__).parent,
                                                  Path(__file__).parent.parent / "refimpl"})


def _learner_line(error: Exception) -> str:
    """' (line N of your code: `...`)': the last line of the traceback outside the libraries, exercises and
    refimpl (the learner's cell), or '' where there is none."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename.startswith("<frozen") or str(Path(frame.filename).resolve()).startswith(LIBRARY):
            continue
        code = f": `{frame.line.strip()}`" if frame.line else ""
        return f" (line {frame.lineno} of your code in {frame.name}{code})"
    return ""


def _earlier_functions(question: Question, fn) -> str:
    """Where `fn` calls a function of an earlier exercise (`Question.depends_on`) that fails its own check: say
    so, and that grading charges it there only."""
    try:
        seen = inspect.getclosurevars(fn)
    except TypeError:  # not a Python function
        return ""
    for name in question.depends_on:
        earlier = seen.nonlocals.get(name, seen.globals.get(name))
        if not callable(earlier):
            continue
        try:
            check(name, earlier)
        except AssertionError:
            return (f"; it calls your {name}, which fails its own check: fix {name} first (grading judges "
                    f"{question.name} with a correct {name} in place of yours, so this costs {name}'s points only)")
    return ""


def _raised(question: Question, error: Exception) -> str:
    if question.memory_budget_mb is not None and out_of_memory(error):
        return over_budget(question.memory_budget_mb, question.memory_rule)
    return f"raised {type(error).__name__}: {error}"


def _check_contract(name: str, fn) -> None:
    """Grading launches the kernel itself (exercises.contracts): say now if it is missing or differs."""
    contract = CONTRACTS[name]
    kernel = getattr(fn, "__globals__", {}).get(contract.kernel)
    wanted = f"`{contract.kernel}({', '.join(contract.params)})`"
    if kernel is None:
        raise AssertionError(f"grading launches your kernel itself, as {wanted}: define a @triton.jit function "
                             f"with that name next to {name}")
    try:
        params = tuple(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    except (TypeError, ValueError):
        params = ()
    if params != contract.params:
        raise AssertionError(f"grading launches {contract.kernel} itself, as {wanted}; yours takes "
                             f"({', '.join(params)})")
    if contract.tiles:
        _check_tiles(kernel, contract)


def _check_tiles(kernel, contract) -> None:
    """A contract with tile sizes (exercises.contracts): grading refuses other tiles; say so now."""
    from exercises.static_check import KernelRefused, kernel_source

    try:
        source = inspect.getsource(getattr(kernel, "fn", kernel))
    except (OSError, TypeError):  # no source to read: grading reads the notebook's
        return
    try:
        kernel_source([source], contract, ())
    except KernelRefused as error:
        raise AssertionError(f"grading refuses your kernel: {error}") from None


def kernel_device() -> str:
    """Where a learner's Triton kernel runs: "cuda" on a GPU with the interpreter off, else "cpu"."""
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def to_device(value, device: str):
    """Tensors (also inside tuples and lists) moved to device; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value
