"""Worker processes that answer messages in order, each over its own socket.

A :class:`ProcessPool` holds ``size`` plain Python interpreters. ``send`` hands task ``index``
of a read to worker ``index % size``; each worker runs its tasks in the order received, so
``receive`` of that worker returns them in that order. Tasks and results are pickled (protocol
5: numpy arrays travel out of band, uncopied), framed by a small header and written with
``sendall``: multiprocessing's ``Connection`` copies the unsent rest of a message on every
partial write and allocates the whole remaining size on every read (5 ms per 4.8 MB message).

A worker that dies raises :class:`WorkerDied` in the caller, one that does not answer within
:data:`HUNG_AFTER_S` raises ``TimeoutError``; an exception raised by a task is raised again in
the caller, with the worker's traceback as its cause. One pool per process is shared
(:func:`shared_pool`) and stopped after :data:`IDLE_STOP_S` without use, so that a process that
goes on to other work does not keep idle workers (each holds the memory of its imports).
"""

from __future__ import annotations

import importlib
import itertools
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

HUNG_AFTER_S = 600.0  # a task this late means a hung worker (a legit task takes seconds)
IDLE_STOP_S = 60.0  # a shared pool unused this long is stopped


class WorkerDied(RuntimeError):
    """A worker process died (killed, out of memory, crashed in native code)."""


class ProcessPool:
    """``size`` worker processes, each importing ``preload`` as it starts."""

    def __init__(self, size: int, preload: list[str]) -> None:
        self.size = size
        self.lock = threading.Lock()  # held by whoever sends and receives a read's tasks
        self.reads = itertools.count()  # read ids: a stopped read's leftovers are told apart
        self.used = time.monotonic()  # updated under _SHARED_LOCK: the reaper reads it there
        self.socks: list[socket.socket] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.send_locks = [threading.Lock() for _ in range(size)]
        # Plain interpreters, not multiprocessing's: fork can deadlock a child of a process
        # running threads (Ray's, torch's OpenMP pool, a reader thread), and spawn and
        # forkserver run the caller's main script again in every child. The child finds
        # modules where this process did, and runs one thread: the processes are the
        # parallelism.
        path = os.pathsep.join(p for p in sys.path if p)
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
        for _ in range(size):
            ours, theirs = socket.socketpair()
            code = f"from {__name__} import _serve; _serve({theirs.fileno()}, {preload!r})"
            proc = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
            theirs.close()  # the child holds the only copy: its exit is our EOF
            ours.settimeout(HUNG_AFTER_S)
            self.socks.append(ours)
            self.procs.append(proc)

    def send(self, read_id: int, index: int, fn: Callable[..., Any], *args: Any) -> int:
        """Hand task ``index`` of read ``read_id``, ``fn(*args)``, to its worker; returns the
        worker's number. ``fn`` must pickle (a module-level function)."""
        worker = index % self.size
        try:
            with self.send_locks[worker]:  # a stopped read's sender may still be sending
                _send_message(self.socks[worker], (read_id, index, fn, args))
        except TimeoutError:
            raise self._hung(worker) from None
        except OSError as exc:
            raise self._died(worker) from exc
        return worker

    def receive(self, worker: int, read_id: int, index: int) -> Any:
        """The result of task ``index`` of read ``read_id`` from ``worker``; raises the task's
        exception, :class:`WorkerDied` if the worker died, TimeoutError if it hung."""
        sock = self.socks[worker]
        sock.settimeout(HUNG_AFTER_S)
        while True:
            try:
                got_read, got_index, result = _receive_message(sock)
            except TimeoutError:
                raise self._hung(worker) from None
            except (EOFError, OSError) as exc:  # EOF: the process ended
                raise self._died(worker) from exc
            if isinstance(result, _Failure) and got_read is None:
                result.raise_()  # a task the worker could not even unpickle
            if (got_read, got_index) != (read_id, index):
                continue  # the leftover of a read that stopped early
            if isinstance(result, _Failure):
                result.raise_()
            return result

    def _hung(self, worker: int) -> TimeoutError:
        pid = self.procs[worker].pid
        return TimeoutError(f"worker process {pid} did not answer in {HUNG_AFTER_S:.0f} s: hung")

    def _died(self, worker: int) -> WorkerDied:
        proc = self.procs[worker]
        try:
            code = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        return WorkerDied(f"worker process {proc.pid} died (exit code {code})")

    def close(self, kill: bool = False) -> None:
        """Stop the workers: kill them, or close their sockets (they exit at EOF)."""
        for proc in self.procs:
            if kill:
                proc.kill()
        for sock in self.socks:
            sock.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _Failure:
    """An exception raised in a worker, sent back to be raised in the caller."""

    def __init__(self, exc: BaseException) -> None:
        self.text = "".join(traceback.format_exception(exc))
        try:
            pickle.dumps(exc)
            self.exc: BaseException = exc
        except Exception:  # an exception that does not pickle still surfaces, as text
            self.exc = RuntimeError(f"{type(exc).__name__}: {exc}")

    def raise_(self) -> None:
        raise self.exc from _WorkerTraceback(self.text)


class _WorkerTraceback(Exception):
    """The traceback of an exception in a worker (the cause of the one raised again)."""

    def __str__(self) -> str:
        return "in the worker process:\n" + self.args[0]


# A message: a header (pickle size, buffer count, buffer sizes), the pickle, and its
# out-of-band buffers.
_HEADER = struct.Struct("<QI")


def _send_message(sock: socket.socket, obj: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    sock.sendall(_HEADER.pack(len(payload), len(raws)) + sizes)
    sock.sendall(payload)
    for raw in raws:
        sock.sendall(raw)


def _receive_message(sock: socket.socket) -> Any:
    size, count = _HEADER.unpack(_receive_exactly(sock, _HEADER.size))
    sizes = struct.unpack(f"<{count}Q", _receive_exactly(sock, 8 * count))
    payload = _receive_exactly(sock, size)
    return pickle.loads(payload, buffers=[_receive_exactly(sock, n) for n in sizes])


def _receive_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        more = sock.recv_into(view[got:])
        if not more:
            raise EOFError("the other end closed its socket")
        got += more
    return buf


def _serve(fd: int, preload: list[str]) -> None:
    """A worker (``python -c``): run each task it is sent and send back the result, until the
    pool closes its end or goes away."""
    for module in preload:
        importlib.import_module(module)
    # Ctrl-C is the pool owner's to handle; a traceback from every worker would bury its message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    while True:
        read_id = index = None
        try:
            read_id, index, fn, args = _receive_message(sock)
            result = fn(*args)
        except (EOFError, ConnectionError):
            return  # closed, or its owner is gone
        except BaseException as exc:  # raised again in the caller
            result = _Failure(exc)
        try:
            _send_message(sock, (read_id, index, result))
        except OSError:
            return


# One pool per process, reused across reads; replaced when its size changes or it failed, and
# stopped when idle.
_SHARED: ProcessPool | None = None
_SHARED_LOCK = threading.Lock()
_REAPER: threading.Thread | None = None


def shared_pool(size: int, preload: list[str]) -> ProcessPool:
    """This process's pool of ``size`` workers, started if needed (``preload`` counts only
    then); marked as used now."""
    global _SHARED, _REAPER
    with _SHARED_LOCK:
        if _SHARED is not None and _SHARED.size != size:
            _SHARED.close()
            _SHARED = None
        if _SHARED is None:
            _SHARED = ProcessPool(size, preload)
        if _REAPER is None:
            _REAPER = threading.Thread(target=_reap_idle, name="process-pool-reaper", daemon=True)
            _REAPER.start()
        _SHARED.used = time.monotonic()
        return _SHARED


def touch(pool: ProcessPool) -> None:
    """Mark ``pool`` as used now (its idle time counts from the end of a read)."""
    with _SHARED_LOCK:
        pool.used = time.monotonic()


def discard(pool: ProcessPool) -> None:
    """Kill ``pool``'s processes (a hung one never answers) and stop sharing it."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is pool:
            _SHARED = None
    pool.close(kill=True)


def _reap_idle() -> None:
    while True:
        time.sleep(min(1.0, IDLE_STOP_S / 4))
        pool = _take_idle_pool()
        if pool is not None:
            try:
                pool.close()
            finally:
                pool.lock.release()


def _take_idle_pool() -> ProcessPool | None:
    """The shared pool, locked and no longer shared, if unused for :data:`IDLE_STOP_S`."""
    global _SHARED
    with _SHARED_LOCK:
        pool = _SHARED
        if pool is None or time.monotonic() - pool.used < IDLE_STOP_S:
            return None
        if not pool.lock.acquire(blocking=False):
            return None  # a read is on
        _SHARED = None
        return pool
