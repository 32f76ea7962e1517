"""A memory budget per call: the evidence that an answer computes the way an exercise teaches.

Where the naive way needs far more memory than the way taught (MLA absorption; routed experts run on their own
tokens only), one call runs with at most `Question.memory_budget_mb` MiB more address space (RLIMIT_AS) than the
process had when the call began: an allocation beyond it raises (torch: RuntimeError, Python: MemoryError), at
once and whatever the machine's load. The learner's check (exercises.feedback) and the grading sandbox
(exercises._child, for visible and hidden cases) use this same module. Plain Python, no project imports: it runs
inside the sandbox.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

OUT_OF_MEMORY = re.compile(r"alloc|out of memory", re.I)


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation refused (by the budget or any memory limit)."""
    return isinstance(error, MemoryError) or bool(OUT_OF_MEMORY.search(str(error)))


def address_space() -> int | None:
    """This process's address space in bytes (Linux: VmSize), or None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmSize:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) << 10 if match else None


@contextmanager
def memory_budget(mb: int | None):
    """Run the block with at most `mb` MiB more address space (RLIMIT_AS soft limit; the hard limit stays);
    an allocation beyond it raises. No limit where `mb` is None, where the platform has no RLIMIT_AS or /proc,
    or where a tighter limit is already set."""
    try:
        import resource
    except ImportError:  # Windows
        resource = None
    used = address_space()
    if mb is None or resource is None or used is None or not hasattr(resource, "RLIMIT_AS"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used + (mb << 20)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def over_budget(mb: int, rule: str) -> str:
    """The message for a call that ran out of its budget: the budget and the rule it enforces."""
    return f"ran out of memory: each call may use {mb} MiB more, and {rule} (see the statement)"
