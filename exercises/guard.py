"""Notice when an answer calls the function it was asked to write (or a library equivalent).

`install(names)` arms a guard on each dotted name ("refimpl.attention.scaled_dot_product_attention",
"refimpl.moe.Router.forward", "torch.softmax"); guards are dormant until `watching(names)` turns some of them on
for the duration of one call. A guarded call made while on is recorded and raises `ForbiddenCall`, so the answer
fails even if it catches the error (the record stays).

Python functions are guarded in place: their `__code__` is swapped for a stub that calls the guard, so every
reference to the function object is covered, including aliases made before (`from refimpl.attention import
scaled_dot_product_attention as f`). Built-ins (torch's C functions) are replaced where they are looked up (the
module or class attribute). A learner who reloads a refimpl module from its source, like one who copies its
text, is not caught: this guards against calling the reference, not against reading it.
"""

from __future__ import annotations

import contextlib
import importlib
import types

_originals: dict[str, object] = {}  # dotted name -> a callable that runs the original
_active: frozenset[str] = frozenset()
_calls: list[str] = []
_launches = [0]  # Triton kernel launches since the counter was last reset


class ForbiddenCall(RuntimeError):
    pass


def message(name: str) -> str:
    return (f"calls {name}, which is the function this exercise asks you to write (or an equivalent of it): "
            "an answer that calls it earns no points")


def _guard(name: str, args: tuple, kwargs: dict):
    if name in _active:
        _calls.append(name)
        raise ForbiddenCall(message(name))
    return _originals[name](*args, **kwargs)


def _resolve(name: str):
    """'a.b.C.meth' -> (owner object, attribute name): the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:-1]:
            owner = getattr(owner, attr)
        return owner, parts[-1]
    raise ImportError(f"cannot import a module for {name}")


def install(names) -> None:
    """Arm a guard on each name (once; a name that does not exist in this torch version is skipped)."""
    for name in names:
        if name in _originals:
            continue
        try:
            owner, attr = _resolve(name)
            target = getattr(owner, attr)
        except (ImportError, AttributeError):
            continue
        func = target
        while isinstance(func, types.FunctionType) and func.__closure__ and hasattr(func, "__wrapped__"):
            func = func.__wrapped__  # a decorator (torch.no_grad): guard the function it wraps
        if isinstance(func, types.FunctionType) and not func.__closure__:
            _originals[name] = types.FunctionType(func.__code__, func.__globals__, func.__name__,
                                                  func.__defaults__, None)
            _originals[name].__kwdefaults__ = func.__kwdefaults__
            func.__globals__["__exercise_guard__"] = _guard
            stub = f"def {func.__name__}(*args, **kwargs):\n    return __exercise_guard__({name!r}, args, kwargs)\n"
            namespace: dict = {}
            exec(compile(stub, f"<guard {name}>", "exec"), namespace)
            func.__code__ = namespace[func.__name__].__code__
            func.__defaults__ = None
            func.__kwdefaults__ = None
            func.__wrapped__ = _originals[name]  # help() and inspect.signature still show the real signature
        else:  # a built-in: replace it where it is looked up
            _originals[name] = target

            def wrapper(*args, _name=name, **kwargs):
                return _guard(_name, args, kwargs)

            setattr(owner, attr, wrapper)


@contextlib.contextmanager
def watching(names):
    """Turn the guards of `names` on for the block; yields the list of guarded calls the block made."""
    global _active
    install(names)
    calls: list[str] = []
    _calls.clear()
    _active = frozenset(names)
    try:
        yield calls
    finally:
        _active = frozenset()
        calls.extend(dict.fromkeys(_calls))  # each name once, in order
        _calls.clear()


def triton_launches() -> list[int]:
    """A one-element counter of Triton kernel launches (interpreted or compiled); set it to 0 before a call.

    Patches Triton's launch once. Without Triton installed the counter stays 0.
    """
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        return _launches
    for cls in (interpreter.InterpretedFunction, jit.JITFunction):
        if getattr(cls.run, "_counts_launches", False):
            continue
        run = cls.run

        def counted(self, *args, _run=run, **kwargs):
            _launches[0] += 1
            return _run(self, *args, **kwargs)

        counted._counts_launches = True
        cls.run = counted
    return _launches
