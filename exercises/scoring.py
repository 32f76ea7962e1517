"""Test cases, their points, and the verdict on each: all in the grader's process, from data only.

Points are kept in integer units of 1/10,000 so that totals are exact for any split: a question's points go in equal
parts to its cases, the remainder to the last case (a 1-point question over 3 cases: 0.3333, 0.3333, 0.3334); or,
with a visible share (`grade --visible-share 0.5`), that share to the visible cases and the rest to the hidden ones,
each part split the same way. A verdict rests on the values the sandbox sent back (compared with refimpl's answer
here), on the static check of the submission's source and, for kernels, on the grader's own compile: never on what
the submission's process says about itself. A hidden case's message names no input and no value: its inputs are
drawn from the instructor's seed, and results.json is the student's to see. A question that calls earlier questions'
functions (`Question.depends_on`) is judged with their references standing in for the learner's
(`reference_answer`): a mistake in an earlier function costs that function's points only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exercises import assignments
from exercises.budget import over_budget
from exercises.compare import mismatch
from exercises.protocol import Outcome
from exercises.questions import QUESTIONS, Question, clone

UNITS = 10_000  # point units per point: scores are exact to 4 decimals
MESSAGE_CAP = 2000  # characters of any one message


@dataclass
class Case:
    question: Question
    label: str  # "visible 1", "hidden 2"
    args: tuple
    expected: object
    expected_mutated: tuple
    units: int  # points x UNITS

    @property
    def hidden(self) -> bool:
        return self.label.startswith("hidden")


def split_points(points: float, n: int) -> list[int]:
    """`points` in UNITS, split over n cases: equal parts, the remainder on the last."""
    return _split_units(round(points * UNITS), n)


def _split_units(total: int, n: int) -> list[int]:
    part = total // n
    return [part] * (n - 1) + [total - part * (n - 1)]


def case_units(points: float, n_visible: int, n_hidden: int, visible_share: float | None = None) -> list[int]:
    """A question's points in UNITS over its visible then hidden cases: equal parts over all cases when
    `visible_share` is None (the default), else that share of the points (rounded to a unit) in equal parts over
    the visible cases and the rest over the hidden ones; each remainder on the last case of its kind."""
    if visible_share is None:
        return split_points(points, n_visible + n_hidden)
    if not 0.0 <= visible_share <= 1.0:
        raise ValueError(f"visible share: expected a number from 0 to 1, got {visible_share}")
    total = round(points * UNITS)
    visible = round(total * visible_share)
    return _split_units(visible, n_visible) + _split_units(total - visible, n_hidden)


def build_cases(assignment: assignments.Assignment, seed: int, visible_share: float | None = None) -> list[Case]:
    """Every test case of the assignment, with refimpl's answers: per question the visible, then the hidden
    (points per case: `case_units`)."""
    cases = []
    for question, points in assignment.questions:
        visible, hidden = question.cases(None), question.cases(seed)
        drawn = visible + hidden
        for (label, args), units in zip(drawn, case_units(points, len(visible), len(hidden), visible_share)):
            expected, mutated = question.expected(args)
            cases.append(Case(question, label, args, expected, mutated, units))
    return cases


def _tensor_bytes(value, depth: int = 0) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)) and depth < 4:
        return sum(_tensor_bytes(v, depth + 1) for v in value)
    return 0


def _decode(value, case_args: tuple, depth: int = 0):
    """A stand-in's argument (exercises._child._encode): ("module", i, name) is a copy of the module of that name
    inside the case's argument i; the rest is data as it came."""
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "module":
        _, index, path = value
        if not (isinstance(index, int) and 0 <= index < len(case_args) and isinstance(path, str)
                and isinstance(case_args[index], torch.nn.Module)):
            raise ValueError("a module that is not one of the call's arguments")
        return clone(case_args[index].get_submodule(path))
    if isinstance(value, tuple) and depth < 3:
        return tuple(_decode(v, case_args, depth + 1) for v in value)
    return value


def reference_answer(case: Case, request: dict) -> dict:
    """The answer to a stand-in's request (exercises._child) while `case` runs: the reference result of the
    earlier question it names (one of `case.question.depends_on`) on the arguments it sent, and those arguments
    after the call where that question writes them in place; {"error": why} otherwise. The arguments may hold at
    most twice the case's own tensor bytes (the reference runs here, in the grader's process)."""
    name, args = request.get("name"), request.get("args")
    if name not in case.question.depends_on or name not in QUESTIONS:
        return {"error": "is not a function this question may call"}
    question = QUESTIONS[name]
    if not isinstance(args, tuple) or len(args) != len(question.arg_names):
        return {"error": f"takes {len(question.arg_names)} arguments ({', '.join(question.arg_names)})"}
    if _tensor_bytes(args) > 2 * _tensor_bytes(case.args):
        return {"error": "was handed more data than the case holds"}
    try:
        args = _decode(args, case.args)
        with torch.no_grad():
            value = question.reference(*args)
    except Exception as error:  # the learner's arguments do not fit the reference
        return {"error": f"raised {type(error).__name__}: {error}"[:500]}
    return {"value": value, "mutated": tuple(args[i] for i in question.mutated_args)}


def _hidden_mismatch(problem: str) -> str:
    """An input-free version of a comparison's message, for a hidden case."""
    for words, short in (("should be a tuple", "the result is not the expected tuple"),
                         ("has shape", "the result has the wrong shape"),
                         ("has dtype", "the result has the wrong dtype"), ("is None", "the result is None"),
                         ("should be", "the result has the wrong type"), ("is wrong at", "wrong values"),
                         (" is ", "wrong value")):
        if words in problem:
            after = " (after the call)" if "after the call" in problem else ""
            return short + after
    return "wrong result"


def verdict(case: Case, outcome: Outcome) -> tuple[bool, str]:
    """(passed, message) for one case from what the sandbox sent back."""
    if outcome.reply is None:
        return False, outcome.failure
    reply, q = outcome.reply, case.question
    if q.memory_budget_mb is not None and reply.get("out_of_memory") is True:
        return False, over_budget(q.memory_budget_mb, q.memory_rule)  # words only: an error fails anyway
    if reply.get("error") is not None or reply.get("error_type") is not None:
        kind = str(reply.get("error_type") or "an error")
        kind = kind if kind.isidentifier() else "an error"
        if case.hidden:  # no text of the submission's: it could quote the inputs
            if kind == "missing":
                return False, f"{q.name} is not defined, or not a function"
            return False, f"raised {kind} (hidden case: its message is not shown)"
        return False, f"raised {str(reply.get('error'))[:MESSAGE_CAP]}"
    canon = q.canonical or (lambda x: x)
    problem = mismatch(canon(reply.get("value")), canon(case.expected), "the result", q.atol, q.rtol)
    mutated = reply.get("mutated") or ()
    for i, want in zip(q.mutated_args, case.expected_mutated):
        got = mutated[q.mutated_args.index(i)] if len(mutated) == len(q.mutated_args) else None
        problem = problem or mismatch(got, want, f"{q.arg_names[i]} after the call", q.atol, q.rtol)
    if problem is None:
        return True, "passed"
    return False, _hidden_mismatch(problem) if case.hidden else problem + _mistake(case, reply.get("value"))


def _mistake(case: Case, value) -> str:
    """For a visible case, the common mistake a wrong answer matches, in the notebook check's words ('; this is
    the answer you get if you ...'), else ''. None for a question with a memory budget: its naive mistakes need
    the budget to be refused, which the grader's process (threads of several submissions) does not set."""
    if case.question.memory_budget_mb is not None:
        return ""
    from exercises.feedback import mistake_hint  # the notebook's check and the grader say the same
    return mistake_hint(case.question, case.args, value)
