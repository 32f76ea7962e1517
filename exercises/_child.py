"""The submission's side of grading: run a notebook's code cells, then call its functions on request.

Started by `exercises.grade` inside the sandbox (`python -m exercises._child`); never imported by the grader.
Everything the submission does (patch torch, register IPython transformers, exit, spawn processes, write files)
happens in this process only: the grader compares the returned values in its own process and kills this one's
whole process group (and PID namespace) when done. Requests come on stdin, replies go out on the original
stdout; the submission's own prints go to /dev/null (stdout) and to the grader's capped stderr log.
"""

from __future__ import annotations

import atexit
import builtins
import io
import linecache
import os
import sys
import types

PROTO_IN, PROTO_OUT = os.dup(0), os.dup(1)  # before anything can print
_null = os.open(os.devnull, os.O_RDWR)
os.dup2(_null, 0)
os.dup2(_null, 1)

import torch  # noqa: E402

from exercises import guard, wire  # noqa: E402

# What a tampering submission would replace to change a verdict in an in-kernel grader (here without effect).
WATCHED = ("torch.allclose", "torch.equal", "torch.isclose", "torch.testing.assert_close", "numpy.allclose",
           "numpy.array_equal", "numpy.testing.assert_allclose", "numpy.testing.assert_array_equal",
           "builtins.__import__", "builtins.exec", "exercises.feedback.check", "exercises.compare.mismatch",
           "exercises.wire.write", "__main__._call", "__main__._serve", "otter.Notebook.check")


class _Shell:
    """Stands in for get_ipython(): magics do nothing; registered transformers are noticed, never run."""

    def __init__(self, namespace: dict):
        self.user_ns = namespace
        self.input_transformers_cleanup, self.input_transformers_post, self.ast_transformers = [], [], []
        self.events = types.SimpleNamespace(register=lambda *a, **k: None, unregister=lambda *a, **k: None)

    def run_line_magic(self, *args, **kwargs):
        return None

    run_cell_magic = system = getoutput = run_line_magic


class _Otter(types.ModuleType):
    """A stand-in for `otter` so a submission's `grader.check(...)` cells run (they are no part of grading)."""

    class Notebook:
        def __init__(self, *args, **kwargs):
            pass

        def check(self, *args, **kwargs):
            return None

        check_all = export = to_pdf = check


def _lookup(dotted: str):
    parts = dotted.split(".")
    obj = sys.modules.get(parts[0])
    for attr in parts[1:]:
        obj = getattr(obj, attr, None)
    return obj


def _snapshot() -> dict:
    for module in ("numpy.testing", "torch.testing", "exercises.feedback"):
        __import__(module)  # imported now, so that a later import by the notebook is not a change
    return {name: _lookup(name) for name in WATCHED}


def _tampering(before: dict, shell: _Shell) -> list[str]:
    found = [f"replaced {name}" for name, obj in _snapshot().items() if obj is not before[name]]
    if shell.input_transformers_cleanup or shell.input_transformers_post or shell.ast_transformers:
        found.append("registered IPython input or AST transformers")
    found.extend(_exit_handlers)
    return found


_exit_handlers: list[str] = []
_real_atexit_register = atexit.register


def _atexit_register(func, *args, **kwargs):
    frame = sys._getframe(1)
    if frame.f_code.co_filename.startswith("<cell"):
        _exit_handlers.append("registered an exit handler")
    return _real_atexit_register(func, *args, **kwargs)


def _children() -> list[str]:
    pids = []
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            pids += open(f"/proc/self/task/{task}/children").read().split()
        except OSError:
            pass
    return pids


def _plain(value, depth: int = 0):
    """What can travel back: plain tensors, numbers, strings, None, tuples; anything else as a description."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().as_subclass(torch.Tensor).clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)) and depth < 3:
        return tuple(_plain(v, depth + 1) for v in value)
    return f"<a {type(value).__module__}.{type(value).__name__} object>"


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:500] + " ..."


def _run_cells(cells: list[str], skip: set[int], namespace: dict, shell: _Shell) -> list[str]:
    from IPython.core.inputtransformer2 import TransformerManager

    transform = TransformerManager().transform_cell
    errors = []
    for i, source in enumerate(cells):
        if i in skip:
            continue
        wire.write(PROTO_OUT, {"event": "cell", "index": i})
        filename = f"<cell {i + 1}>"
        try:
            code = transform(source)
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # for inspect / Triton
            exec(compile(code, filename, "exec"), namespace)
        except BaseException as error:  # SystemExit and KeyboardInterrupt too: the next cells still run
            errors.append(f"cell {i + 1}: {_error_text(error)}")
    return errors


def _call(namespace: dict, request: dict, launches: list[int]) -> dict:
    name = request["name"]
    fn = namespace.get(name)
    if fn is None:
        return {"error": f"{name} is not defined: the notebook has no function of that name"}
    if not callable(fn):
        return {"error": f"{name} is not a function but {type(fn).__name__}"}
    args = torch.load(io.BytesIO(request["args"]), weights_only=False)  # from the grader: trusted
    launches[0] = 0
    result, error = None, None
    with guard.watching(request["forbidden"]) as forbidden_calls:
        try:
            result = fn(*args)
        except BaseException as e:  # an answer's SystemExit or KeyboardInterrupt fails this case only
            error = _error_text(e)
    return {"value": _plain(result), "mutated": tuple(_plain(args[i]) for i in request["mutated"]),
            "error": error, "forbidden": list(forbidden_calls), "launches": launches[0]}


def _serve() -> None:
    init = wire.read(PROTO_IN, trusted=True)
    sys.modules["otter"] = _Otter("otter")
    guard.install(init["forbidden"])
    launches = guard.triton_launches() if init["triton"] else [0]
    namespace = {"__name__": "__main__", "__builtins__": builtins, "display": lambda *a, **k: None}
    shell = _Shell(namespace)
    namespace["get_ipython"] = lambda: shell
    atexit.register = _atexit_register
    before = _snapshot()
    errors = _run_cells(init["cells"], set(init["skip"]), namespace, shell)
    tampering = _tampering(before, shell)
    if _children():
        tampering.append("left a process running after its cells (killed with the sandbox)")
    wire.write(PROTO_OUT, {"event": "loaded", "errors": errors, "tampering": tampering})
    while True:
        try:
            request = wire.read(PROTO_IN, trusted=True)
        except wire.Closed:
            break
        reply = _call(namespace, request, launches)
        reply["tampering"] = _tampering(before, shell)
        wire.write(PROTO_OUT, reply)
    os._exit(0)  # skip the submission's exit handlers


if __name__ == "__main__":
    _serve()
