"""Length-prefixed messages between the grader and a submission's sandboxed process (torch.save bytes).

The grader reads the submission's replies with `torch.load(weights_only=True)`: tensors, numbers, strings,
lists, tuples and dicts only, so a reply cannot run code in the grader. Replies are size-capped.
"""

from __future__ import annotations

import io
import os
import select
import struct
import time

import torch

HEADER = struct.Struct("<Q")


class Timeout(Exception):
    pass


class Closed(Exception):
    pass


class BadMessage(Exception):
    pass


def dumps(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write(fd: int, obj, deadline: float | None = None) -> None:
    """Send obj; with a deadline (the grader's side, fd non-blocking) a reader that stops reading is a Timeout."""
    data = dumps(obj)
    view = memoryview(HEADER.pack(len(data)) + data)
    while view:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([], [fd], [], wait)[1]:
                raise Timeout()
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            continue


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise Timeout()
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise Closed()
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read(fd: int, deadline: float | None = None, limit: int = 256 << 20, trusted: bool = False):
    """The next message; `trusted` (the grader's own messages) allows any pickled object."""
    (size,) = HEADER.unpack(_read_exact(fd, HEADER.size, deadline))
    if size > limit:
        raise BadMessage(f"a reply of {size:,} bytes, over the {limit:,}-byte limit")
    data = _read_exact(fd, size, deadline)
    try:
        return torch.load(io.BytesIO(data), weights_only=not trusted)
    except Exception as error:  # anything the submission's process could send that is not a valid reply
        raise BadMessage(f"an unreadable reply ({type(error).__name__})") from None
