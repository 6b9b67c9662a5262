"""An iterator run ahead in a background thread, a bounded number of items ahead.

Used to overlap reading and decoding with whatever consumes the items (a forward pass). The
thread stops when its consumer stops early, so an exception downstream neither leaves it
blocked forever on a full queue nor keeps reading a shard nobody wants.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()
_POLL_S = 0.1  # how often a producer blocked on a full queue checks whether to stop


def in_background(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` as produced by a daemon thread at most ``depth`` items ahead; an
    exception raised while producing is re-raised here, at the item where it happened."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(items, q, stop), daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        _drain(q)  # unblocks a producer waiting on a full queue


class _Raised:
    """An exception from the producer, boxed so that a yielded exception object stays data."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _produce(items: Iterable[Any], q: queue.Queue[Any], stop: threading.Event) -> None:
    it = iter(items)
    try:
        for item in it:
            if not _put(q, item, stop):
                return
        _put(q, _DONE, stop)
    except BaseException as exc:  # re-raised in the consumer
        _put(q, _Raised(exc), stop)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a generator's cleanup (its own threads, open files) runs now


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has gone; whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _drain(q: queue.Queue[Any]) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
