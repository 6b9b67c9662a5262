"""One writer per output directory: a lock file naming the process that holds it.

On local disks the lock is taken with ``O_CREAT | O_EXCL`` (atomic). A lock whose process is
gone (killed, the machine rebooted) is taken over: a run killed with SIGKILL never blocks the
rerun that resumes it. Object stores have no exclusive create in pyarrow, so there the lock is
a best-effort marker (checked, then put): two runs that start within the same second may both
proceed, which costs duplicated work but never a corrupt output, since every output file is
one put of a finished file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator

from ssl_kd import atomic, storage
from ssl_kd.errors import UserError

log = logging.getLogger(__name__)


def _holder() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(holder: dict[str, object]) -> bool:
    """Whether the lock's process still runs (always assumed for another machine's)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", 0)), 0)  # type: ignore[call-overload]
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _read(path: str) -> dict[str, object]:
    try:
        holder = json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _try_create(path: str) -> bool:
    """Create the lock file exclusively; False if it exists."""
    if storage.is_remote(path):
        if storage.is_file(path):
            return False
        atomic.write_text(path, json.dumps(_holder()))
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(_holder()))
    return True


@contextlib.contextmanager
def dir_lock(directory: str, command: str) -> Iterator[None]:
    """Hold ``directory/.<command>.lock`` for the block; UserError if a live process holds it."""
    path = storage.join(directory, f".{command}.lock")
    for _ in range(2):  # a second try after taking over a dead holder's lock
        if _try_create(path):
            break
        holder = _read(path)
        if _alive(holder):
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
            raise UserError(
                f"another ssl-kd {command} ({who}) is writing {storage.display(directory)}; "
                f"wait for it to finish, or delete {storage.display(path)} if it is dead"
            )
        log.info("taking over the lock of a %s run that is gone (%s)", command, holder)
        storage.delete(path)
    else:
        raise UserError(f"could not take the lock {storage.display(path)}; try again")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            storage.delete(path)
