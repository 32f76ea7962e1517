"""Compare a learner's answer with the expected one and say, in plain words, what is wrong.

Used in two places with the same messages: the in-notebook check (`exercises.feedback.check`) and the grader,
which compares in its own process what the sandboxed submission sent back. Nothing here runs learner code:
`answer` is data (tensors, numbers, tuples), never called.
"""

from __future__ import annotations

import math

import torch


def describe(value) -> str:
    """A short description of an argument or a result: 'float32 tensor of shape (2, 3)', '5', 'a ModelConfig'."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (bool, int, float, str)) or value is None:
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    name = getattr(value, "name", "")
    return f"a {type(value).__name__}" + (f" ({name})" if isinstance(name, str) and name else "")


def mismatch(answer, expected, what: str = "the result", atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """None if `answer` matches `expected`, else one sentence saying the first thing that is wrong.

    Tensors: same shape, same dtype, values within atol + rtol * |expected| (NaN where NaN is expected);
    integer tensors and ints exactly; floats within the tolerances; tuples element by element.
    """
    if isinstance(expected, (tuple, list)):
        if not isinstance(answer, (tuple, list)):
            return f"{what} should be a tuple of {len(expected)} values, got {describe(answer)}"
        if len(answer) != len(expected):
            return f"{what} should be a tuple of {len(expected)} values, got {len(answer)}"
        for i, (a, e) in enumerate(zip(answer, expected)):
            problem = mismatch(a, e, f"element {i} of {what}", atol, rtol)
            if problem:
                return problem
        return None
    if answer is None:
        return f"{what} is None: the function returns nothing (is its body still the stub?)"
    if isinstance(expected, torch.Tensor):
        return _tensor_mismatch(answer, expected, what, atol, rtol)
    if isinstance(expected, bool) or isinstance(expected, int):
        if isinstance(answer, torch.Tensor) and answer.numel() == 1 and not answer.is_floating_point():
            answer = answer.item()
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        if isinstance(answer, bool) or not isinstance(answer, int):
            return f"{what} should be an int, got {describe(answer)}"
        return None if answer == expected else f"{what} is {answer:,}, expected {expected:,}"
    if isinstance(expected, float):
        if isinstance(answer, torch.Tensor) and answer.numel() == 1:
            answer = answer.item()
        if isinstance(answer, bool) or not isinstance(answer, (int, float)):
            return f"{what} should be a number, got {describe(answer)}"
        if math.isclose(answer, expected, rel_tol=rtol, abs_tol=atol):
            return None
        return f"{what} is {answer:,.6g}, expected {expected:,.6g}"
    raise TypeError(f"expected value of unsupported type {type(expected).__name__}")  # a bug in a question


def _tensor_mismatch(answer, expected: torch.Tensor, what: str, atol: float, rtol: float) -> str | None:
    if not isinstance(answer, torch.Tensor):
        return f"{what} should be a torch.Tensor ({describe(expected)}), got {describe(answer)}"
    if tuple(answer.shape) != tuple(expected.shape):
        return f"{what} has shape {tuple(answer.shape)}, expected {tuple(expected.shape)}"
    if answer.dtype != expected.dtype:
        return f"{what} has dtype {answer.dtype}, expected {expected.dtype}"
    if not expected.is_floating_point():
        wrong = answer != expected
    else:
        a, e = answer.double(), expected.double()
        close = (a - e).abs() <= atol + rtol * e.abs()
        close |= e.isnan() & a.isnan()
        close |= e.isinf() & (a == e)
        wrong = ~close
    n_wrong = int(wrong.sum())
    if n_wrong == 0:
        return None
    index = tuple(int(i) for i in wrong.nonzero()[0])
    got, want = answer[index].item(), expected[index].item()
    tolerance = "" if not expected.is_floating_point() else f" (tolerance {atol:g} + {rtol:g} * |expected|)"
    return (f"{what} is wrong at index {index}: got {got:.6g}, expected {want:.6g}; "
            f"{n_wrong} of {expected.numel()} values differ{tolerance}")
