"""The mutant corpus as one list, and how a wrong answer fares: the visible check, and the hidden points it
loses at an instructor's seed (judged in-process as the grader judges what the sandbox sends back: values
compared with exercises.compare, each call under the question's memory budget)."""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from unittest import mock

from exercises import assignments, feedback
from exercises.compare import mismatch
from exercises.questions import EXERCISES, MISTAKES, QUESTIONS
from exercises.scoring import case_units

from . import answers, flash, kernels

SEEDS = (0, 1, 2, 3)  # instructor seeds: the stratified hidden cases catch every mutant at each
# (question, what is wrong, function, the mistake's words the check must print or None)
MUTANTS = ([(name, f"mistake: {what}", fn, what) for name, ms in MISTAKES.items() for what, fn in ms
            if not QUESTIONS[name].triton]
           + [(name, what, fn, None) for name, what, fn in answers.MUTANTS]
           + [(name, what, fn, None) for name, what, fn in kernels.MUTANTS]
           + [(name, what, fn, None) for name, what, fn in flash.MUTANTS])


def exercise_of(name: str) -> str:
    return next(e for e, exercise in EXERCISES.items() if name in exercise.questions)


@contextmanager
def values_only(name: str):
    """The check judging values only: the mistakes' references may call refimpl (the calls are tested in
    tests/test_exercises.py), and the kernel mutants share one kernel with a MUTANT constexpr, which the
    contract check (its own test) would refuse before any value is compared."""
    relaxed = dataclasses.replace(QUESTIONS[name], forbidden=())
    with mock.patch.dict(feedback.QUESTIONS, {name: relaxed}), \
            mock.patch.object(feedback, "_check_contract", lambda name, fn: None):
        yield


def visible_message(name: str, fn) -> str | None:
    """The learner's check's message on `fn`, or None when it passes."""
    with values_only(name):
        try:
            feedback.check(name, fn)
        except AssertionError as failed:
            return str(failed)
    return None


@functools.cache
def _hidden(name: str, seed: int) -> list:
    """[(args, expected, expected mutated args)] of a question's hidden cases at a seed, computed once."""
    question = QUESTIONS[name]
    return [(args, *question.expected(args)) for _, args in question.cases(seed)]


def _passes(name: str, fn, args, expected, expected_mutated) -> bool:
    question = QUESTIONS[name]
    canon = question.canonical or (lambda x: x)
    given = feedback.clone(args)
    try:
        with feedback.memory_budget(question.memory_budget_mb):
            result = fn(*given)
    except Exception:
        return False
    if mismatch(canon(result), canon(expected), "the result", question.atol, question.rtol):
        return False
    return not any(mismatch(given[i], want, "", question.atol, question.rtol)
                   for i, want in zip(question.mutated_args, expected_mutated))


@functools.cache
def _points(name: str) -> float:
    return dict((q.name, p) for q, p in assignments.load(exercise_of(name)).questions)[name]


def hidden_units_lost(name: str, fn, seed: int) -> tuple[int, int]:
    """(units lost, units at stake) on the question's hidden cases at `seed` (exercises.scoring's split)."""
    question = QUESTIONS[name]
    cases = _hidden(name, seed)
    units = case_units(_points(name), question.n_visible, len(cases))[question.n_visible:]
    lost = sum(u for u, case in zip(units, cases) if not _passes(name, fn, *case))
    return lost, sum(units)
