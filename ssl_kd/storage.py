"""Where bytes live: local paths and object-store URLs (``s3://bucket/prefix``) behind one API.

Every stage names its inputs and outputs as strings, either a local path or a URL that
``pyarrow.fs.FileSystem.from_uri`` opens. Object stores have no directories and no rename: a
"directory" is a key prefix, and an atomic commit is one put of a finished file (see
:mod:`ssl_kd.atomic`). Credentials and the endpoint come from the environment as the AWS SDK
reads them (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``~/.aws``, instance roles); this module never reads,
logs or stores them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs

from ssl_kd.errors import UserError

# Schemes that pyarrow's filesystems serve; http(s):// and pipe: shards go through webdataset.
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
_READ_BUFFER = 1 << 20
_RANGE_THREADS = 16  # concurrent range requests per object (each costs a round trip)

PathLike = str | os.PathLike[str]


def is_remote(url: PathLike) -> bool:
    """True for an object-store URL (``s3://…``), False for a local path or ``file://``."""
    scheme, sep, _ = str(url).partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def local_path(url: PathLike) -> str:
    """A local path as a string (``file://`` stripped)."""
    text = os.fspath(url)
    return text[len("file://") :] if text.startswith("file://") else text


@functools.cache
def _filesystem(root: str, pid: int) -> pafs.FileSystem:
    # One client per bucket and process: a client made before a fork (DataLoader workers)
    # must not be shared with the child, hence the pid in the key.
    try:
        fs, _ = pafs.FileSystem.from_uri(root)
    except OSError as exc:
        raise UserError(
            f"cannot reach {root}: {_first_line(exc)} (check AWS_ENDPOINT_URL, AWS_REGION and "
            "the credentials in the environment)"
        ) from None
    return fs


def clear_cache() -> None:
    """Forget cached object-store clients (after the endpoint or credentials changed)."""
    _filesystem.cache_clear()


def resolve(url: PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``url`` and the path within it."""
    text = os.fspath(url)
    if not is_remote(text):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(text))
    if "?" in text:
        raise UserError(
            f"{display(text)}: options in a URL (?…) are not supported; set them in the "
            "environment (AWS_ENDPOINT_URL, AWS_REGION, …)"
        )
    scheme, _, rest = text.partition("://")
    bucket = rest.split("/", 1)[0]
    return _filesystem(f"{scheme}://{bucket}", os.getpid()), rest.rstrip("/")


def join(base: PathLike, *parts: str) -> str:
    """``base/part/…`` for a path or a URL (``Path`` would fold ``s3://`` into ``s3:/``)."""
    text = os.fspath(base)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(local_path(text), *parts))


def name(url: PathLike) -> str:
    """The last component of a path or URL."""
    return os.fspath(url).rstrip("/").rsplit("/", 1)[-1]


def parent(url: PathLike) -> str:
    """The directory (or key prefix) holding ``url``."""
    text = os.fspath(url)
    if is_remote(text):
        return text.rstrip("/").rsplit("/", 1)[0]
    return str(Path(local_path(text)).parent)


def display(url: PathLike) -> str:
    """``url`` as shown to a user: without a query string, where options could hide."""
    return os.fspath(url).split("?", 1)[0]


def _info(url: PathLike) -> pafs.FileInfo:
    fs, path = resolve(url)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise UserError(f"cannot reach {display(url)}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def exists(url: PathLike) -> bool:
    """Whether a file or a non-empty directory (prefix) is at ``url``."""
    if not is_remote(url):
        return os.path.exists(local_path(url))
    return _info(url).type != pafs.FileType.NotFound


def is_file(url: PathLike) -> bool:
    """Whether a file (object) is at ``url``."""
    if not is_remote(url):
        return os.path.isfile(local_path(url))
    return _info(url).type == pafs.FileType.File


def holds_files(url: PathLike) -> bool:
    """Whether ``url`` is a directory with anything in it (a prefix with objects under it)."""
    if not is_remote(url):
        path = local_path(url)
        return os.path.isdir(path) and any(os.scandir(path))
    return is_dir(url)


def size(url: PathLike) -> int:
    """The size in bytes of the file or object at ``url``."""
    if not is_remote(url):
        return os.path.getsize(local_path(url))
    return int(_info(url).size or 0)


def version(url: PathLike) -> str:
    """``size:mtime_ns`` of the file or object at ``url``: it changes when the file is rewritten."""
    if not is_remote(url):
        st = os.stat(local_path(url))
        return f"{st.st_size}:{st.st_mtime_ns}"
    info = _info(url)
    if info.type != pafs.FileType.File:
        raise UserError(f"no file at {display(url)}")
    return f"{info.size}:{info.mtime_ns}"


def is_dir(url: PathLike) -> bool:
    """Whether ``url`` is a directory (for an object store: a prefix with objects under it)."""
    if not is_remote(url):
        return os.path.isdir(local_path(url))
    return _info(url).type == pafs.FileType.Directory


def list_dir(url: PathLike, pattern: str = "*") -> list[str]:
    """Sorted paths/URLs of the files directly in ``url`` whose names match ``pattern``."""
    if not is_remote(url):
        d = Path(local_path(url))
        if not d.is_dir():
            return []
        return sorted(str(p) for p in d.glob(pattern) if p.is_file())
    fs, path = resolve(url)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise UserError(f"cannot list {display(url)}: {_first_line(exc)}") from None
    base = os.fspath(url).split("?", 1)[0].rstrip("/")
    return sorted(
        f"{base}/{info.base_name}"
        for info in infos
        if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.base_name, pattern)
    )


def glob(pattern: str) -> list[str]:
    """Files matching ``pattern``; for a URL, wildcards may appear in the last component only."""
    if not is_remote(pattern):
        import glob as globlib

        return sorted(p for p in globlib.glob(local_path(pattern)) if os.path.isfile(p))
    directory, leaf = pattern.rsplit("/", 1)
    if any(ch in directory for ch in "*?["):
        raise UserError(
            f"{pattern}: in an object-store URL only the file name may hold wildcards "
            "(e.g. s3://bucket/shards/u-*.tar)"
        )
    return list_dir(directory, leaf)


def makedirs(url: PathLike) -> None:
    """Create a local directory (and parents); object stores need none."""
    if not is_remote(url):
        Path(local_path(url)).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def open_input(url: PathLike) -> Iterator[BinaryIO]:
    """A buffered binary stream over the file or object at ``url``."""
    if not is_remote(url):
        with open(local_path(url), "rb", buffering=_READ_BUFFER) as fh:
            yield fh
        return
    fs, path = resolve(url)
    try:
        stream = fs.open_input_stream(path, buffer_size=_READ_BUFFER)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such object: {display(url)}") from None
    with stream:
        yield stream  # type: ignore[misc]


def read_bytes(url: PathLike) -> bytes:
    """The whole file or object."""
    with open_input(url) as fh:
        return fh.read()


def loadable(url: PathLike) -> str | BinaryIO:
    """What ``torch.load``, ``torch.export.load`` or ``zipfile`` can open: a local path as it
    is (read lazily, no copy), an object store's object as its bytes in memory."""
    return io.BytesIO(read_bytes(url)) if is_remote(url) else local_path(url)


def read_text(url: PathLike) -> str:
    """The whole file or object, decoded as UTF-8."""
    return read_bytes(url).decode("utf-8")


def sha256(url: PathLike) -> str:
    """Hex sha256 of the file or object at ``url``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open_input(url) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_ranges(url: PathLike, offsets: list[int], sizes: list[int]) -> list[bytes]:
    """The byte ranges ``[offset, offset + size)`` of one file or object, in the order given.

    An object store answers each range with a request of its own, so those run concurrently.
    """
    if not is_remote(url):
        fd = os.open(local_path(url), os.O_RDONLY)
        try:
            return [os.pread(fd, n, at) for at, n in zip(offsets, sizes, strict=True)]
        finally:
            os.close(fd)
    fs, path = resolve(url)
    # read_at is thread-safe on a random-access file.
    with fs.open_input_file(path) as fh, ThreadPoolExecutor(_RANGE_THREADS) as pool:
        return list(pool.map(fh.read_at, sizes, offsets))


def upload(local: PathLike, url: PathLike) -> None:
    """Copy a finished local file to ``url`` in one call (one put, or one multipart upload that
    becomes visible only when complete)."""
    fs, path = resolve(url)
    try:
        pafs.copy_files(os.fspath(local), path, pafs.LocalFileSystem(), fs)
    except OSError as exc:
        raise UserError(f"cannot write {display(url)}: {_first_line(exc)}") from None


def upload_tree(local: PathLike, url: PathLike, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under the local directory ``local`` to ``url``, keeping relative names;
    the files named in ``last`` go after all others (a manifest that says the rest is there).
    Returns the URLs written."""
    root = Path(local)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)  # stable: the others keep their order
    written = []
    for path in files:
        dest = join(url, *path.relative_to(root).parts)
        upload(path, dest)
        written.append(dest)
    return written


def delete(url: PathLike) -> None:
    """Remove a file or object; nothing happens if it is absent."""
    if not is_remote(url):
        Path(local_path(url)).unlink(missing_ok=True)
        return
    fs, path = resolve(url)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def delete_tree(url: PathLike) -> None:
    """Remove a directory (or every object under a prefix); nothing happens if it is absent."""
    if not is_remote(url):
        shutil.rmtree(local_path(url), ignore_errors=True)
        return
    fs, path = resolve(url)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)  # delete_dir_contents would leave a directory marker object
