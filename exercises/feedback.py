"""The learner's check, in the notebook: run one exercise's visible cases now and say what is wrong.

`check("causal_sdpa", causal_sdpa)` calls the function on each visible case, compares with refimpl's answer and
raises AssertionError with one plain sentence (the case, its inputs' shapes, what is wrong: shape, dtype, the
first wrong value) on the first failure; it returns None when every case passes. otter's `grader.check(...)`
cells in the student notebooks call it. Grading runs the same cases and more (hidden ones), elsewhere.

A Triton exercise gets its inputs on the GPU when there is one and the interpreter is off (a compiled kernel
refuses CPU tensors); its answer is brought back to the CPU, where the expected one is computed.
"""

from __future__ import annotations

import inspect
import os

import torch

from exercises import guard
from exercises.compare import describe, mismatch
from exercises.contracts import CONTRACTS
from exercises.questions import QUESTIONS, clone


def check(name: str, fn) -> None:
    question = QUESTIONS[name]
    if not callable(fn):
        raise AssertionError(f"{name} should be a function, got {describe(fn)}")
    if question.triton:
        _check_contract(name, fn)
    canon = question.canonical or (lambda x: x)
    launches = guard.triton_launches() if question.triton else [1]
    device = kernel_device() if question.triton else "cpu"
    for label, args in question.cases(None):
        expected, expected_mutated = question.expected(args)
        given = to_device(clone(args), device)
        inputs = ", ".join(f"{n}={describe(a)}" for n, a in zip(question.arg_names, args))
        where = f"{name}({inputs}), {label} case"
        if question.triton:
            launches[0] = 0
        with guard.watching(question.forbidden) as forbidden:
            try:
                result = fn(*given)
            except guard.ForbiddenCall:
                result = None
            except NotImplementedError:
                raise AssertionError(f"{name} is not written yet: replace `raise NotImplementedError` with "
                                     "your code") from None
            except Exception as error:
                raise AssertionError(f"{where}: raised {type(error).__name__}: {error}") from None
        if forbidden:
            raise AssertionError(f"{where}: {guard.message(forbidden[0])}")
        if not launches[0]:
            raise AssertionError(f"{where}: launched no Triton kernel; the exercise is to write one")
        result, given = to_device(result, "cpu"), to_device(given, "cpu")
        problem = mismatch(canon(result), canon(expected), "the result", question.atol, question.rtol)
        for i, want in zip(question.mutated_args, expected_mutated):
            problem = problem or mismatch(given[i], want, f"{question.arg_names[i]} after the call",
                                          question.atol, question.rtol)
        if problem:
            raise AssertionError(f"{where}: {problem}")


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
