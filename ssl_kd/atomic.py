"""Atomic file output, on a filesystem or an object store.

Local: write to a hidden temp name in the same directory, then rename. Object store (no rename):
write a local temp file, then upload it in one call, so the object appears only once complete.
Either way a reader (or a rerun deciding what is done) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from ssl_kd import storage


def staging_path(final: storage.PathLike) -> Path:
    """A fresh temp path to write ``final``'s content to before :func:`commit`."""
    if storage.is_remote(final):
        return Path(tempfile.mkdtemp(prefix="ssl_kd-stage-")) / storage.name(final)
    path = Path(storage.local_path(final))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"


def commit(tmp: Path, final: storage.PathLike) -> None:
    """Publish the finished ``tmp`` as ``final`` (rename, or one upload); ``tmp`` is gone after."""
    try:
        if storage.is_remote(final):
            storage.upload(tmp, final)
        else:
            os.replace(tmp, storage.local_path(final))
    finally:
        discard(tmp, final)


def discard(tmp: Path, final: storage.PathLike) -> None:
    """Drop a temp path made by :func:`staging_path` (after a failure, or after an upload)."""
    if storage.is_remote(final):
        shutil.rmtree(tmp.parent, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: storage.PathLike) -> Iterator[Path]:
    """Yield a local temp path to write; it becomes ``path`` on success, and is removed on
    error (nothing appears at ``path`` then)."""
    tmp = staging_path(path)
    try:
        yield tmp
    except BaseException:
        discard(tmp, path)
        raise
    commit(tmp, path)


def write_text(path: storage.PathLike, text: str) -> str:
    """Atomically write ``text`` to ``path``; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return os.fspath(path)
