"""The conversation with one sandbox: start it, let it run the notebook's cells (or load the kernels), send it
each test case's inputs, and bring back what it answered, or why it could not.

A cell that hangs or ends the process is skipped and the sandbox started again without it; a call that hangs or
ends the process fails that case (two such failures stop the question); everything has a wall-clock limit. What
comes back is data (`wire.read` with `weights_only=True`), judged by exercises.scoring in the grader's process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from exercises import wire
from exercises.sandbox import Isolation, Sandbox

MAX_RESTARTS = 4  # sandbox starts per group of cases (after a hang or a crash) before the rest is given up


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 3072  # address space of the submission's process
    cell_timeout: float = 60.0  # seconds per notebook cell
    startup_timeout: float = 120.0  # seconds to start Python and import torch
    call_timeout_scale: float = 1.0  # multiplies each question's per-call limit
    submission_timeout: float = 600.0  # seconds per submission in all


@dataclass
class Outcome:
    reply: dict | None = None  # what the sandbox answered: value, mutated, error, error_type
    failure: str = ""  # why there is no reply (hang, crash, time used up): input-free words


@dataclass
class Call:
    name: str  # the question (the notebook's function, or the kernel's question)
    args: tuple
    mutated: tuple[int, ...]
    timeout: float
    memory_mb: int | None = None  # the question's memory budget per call (exercises.budget), if any
    # request -> answer, for the stand-ins of the earlier questions this one depends on (exercises.scoring)
    reference: Callable[[dict], dict] | None = None


class Conversation:
    """Run `calls` in sandboxes started with `init` ({"mode": "cells", "cells": [...]} or {"mode": "kernel",
    "kernels": {...}}; "skip": the indices of cells not to run, which grows by each cell that hangs or ends the
    process); notes (cells skipped, errors) go to `notes`."""

    def __init__(self, isolation: Isolation, runtime: Path, hide: tuple[Path, ...], limits: Limits, init: dict,
                 notes: list[str], deadline: float):
        self.isolation, self.runtime, self.hide, self.limits = isolation, runtime, hide, limits
        self.init, self.notes, self.deadline = dict(init, skip=list(init.get("skip", []))), notes, deadline
        self.sandbox: Sandbox | None = None

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _start(self) -> bool:
        """Start a sandbox and load it; False when a cell had to be skipped or it could not start."""
        current, timeout = None, self.limits.startup_timeout
        try:
            sandbox = Sandbox(self.isolation, self.runtime, self.hide, self.limits.memory_mb, self.init,
                              self.limits.startup_timeout)
        except (OSError, wire.Timeout) as error:
            self._note(f"the submission's process did not start ({type(error).__name__})")
            return False
        try:
            while True:
                message = sandbox.read(max(0.0, min(timeout, self.deadline - time.monotonic())))
                if message.get("event") == "cell" and isinstance(message.get("index"), int):
                    current, timeout = message["index"], self.limits.cell_timeout
                elif message.get("event") == "loaded":
                    for note in message.get("errors") or []:
                        self._note(str(note)[:600])
                    self.sandbox = sandbox
                    return True
                else:
                    raise wire.BadMessage("an unexpected message")
        except (wire.Timeout, wire.Closed, wire.BadMessage) as error:
            tail = sandbox.last_error_line()
            sandbox.kill()
            if time.monotonic() >= self.deadline:
                self._note(f"the notebook's cells used up the submission's "
                           f"{self.limits.submission_timeout:.0f} s")
            elif current is None or not isinstance(current, int) or current in self.init["skip"]:
                self._note(f"the submission's process did not start ({type(error).__name__}"
                           f"{': ' + tail if tail else ''})")
            else:
                what = {wire.Timeout: f"ran longer than {self.limits.cell_timeout:.0f} s",
                        wire.Closed: "ended the process (exit, crash or memory limit)"}.get(
                    type(error), "sent an unreadable message")
                self._note(f"code cell {current + 1} {what}: skipped, the other cells ran without it")
                self.init["skip"] = self.init["skip"] + [current]
            return False

    def run(self, calls: list[Call]) -> list[Outcome]:
        outcomes, starts, failures = [], 0, {}
        for call in calls:
            outcomes.append(self._one(call, failures))
            while outcomes[-1] is None:  # the sandbox was not up: start it (skipping a cell) and try again
                if starts > MAX_RESTARTS or time.monotonic() >= self.deadline:
                    outcomes[-1] = Outcome(failure="not run: the submission's process could not be started or "
                                           "was restarted too many times")
                    break
                starts += 1
                if self._start():
                    outcomes[-1] = self._one(call, failures)
        self.close()
        return outcomes

    def _one(self, call: Call, failures: dict) -> Outcome | None:
        if time.monotonic() >= self.deadline:
            return Outcome(failure=f"not run: the submission used up its {self.limits.submission_timeout:.0f} s")
        if failures.get(call.name, 0) >= 2:
            return Outcome(failure=f"not run: {call.name} timed out or crashed on 2 earlier cases")
        if self.sandbox is None:
            return None
        try:
            reply = self.sandbox.call(call.name, call.args, call.mutated, call.timeout, call.memory_mb,
                                      call.reference)
        except (wire.Timeout, wire.Closed, wire.BadMessage, OSError) as error:
            failures[call.name] = failures.get(call.name, 0) + 1
            self.close()
            return Outcome(failure={wire.Timeout: f"took longer than {call.timeout:.0f} s (stopped)",
                                    wire.BadMessage: "the process sent an unreadable reply"}.get(
                type(error), "the process ended during the call (exit, crash or memory limit)"))
        return Outcome(reply=reply if isinstance(reply, dict) else {"error_type": "unreadable reply"})

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.kill()
            self.sandbox = None
