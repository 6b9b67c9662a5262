"""A minimal streaming tar reader for WebDataset shards, about 10x faster than ``tarfile``.

Python's ``tarfile`` in stream mode spends ~130 µs per member on 2 cores (7.7k members/s
measured on the Fashion-MNIST shards), more than decoding a small PNG; this reader parses the
512-byte headers directly. It understands ustar/GNU/PAX as written by ``tarfile``, GNU tar,
webdataset and img2dataset: long names (GNU ``L``, PAX ``path``), ustar prefixes, base-256
sizes; directories, links and global headers are skipped. A short read raises
:class:`TruncatedTarError`; a header with a bad checksum raises :class:`TarFormatError`.
"""

from __future__ import annotations

import contextlib
import gzip
import re
from collections.abc import Iterator
from typing import BinaryIO

from webdataset.gopen import gopen

from ssl_kd import storage

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


class TarFormatError(ValueError):
    """The stream is not a tar archive (or its header is corrupt)."""


class TruncatedTarError(TarFormatError):
    """The archive ends inside a header or a member's data."""


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    while 0 < len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number {text!r} in tar header (not a tar file?)") from None


def _pax_path(data: bytes) -> str | None:
    path = None
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def iter_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for every regular file of a tar stream, in order."""
    long_name: str | None = None
    first = True
    while True:
        header = _read_exact(stream, BLOCK)
        if not header or header == _ZERO_BLOCK:
            return  # end of archive (a missing end marker cannot be told from a clean end)
        if len(header) < BLOCK:
            raise TruncatedTarError("archive ends inside a header")
        # Checksums cost ~15% of reading; check the first header (is this a tar at all?) and
        # any header without the ustar magic that every modern writer puts there.
        if first or header[257:262] != b"ustar":
            stored = _number(header[148:156])
            if stored != sum(header[:148]) + 256 + sum(header[156:]):
                raise TarFormatError("bad tar header checksum (not a tar file, or corrupt)")
            first = False
        size = _number(header[124:136])
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = _read_exact(stream, padded)
        if len(data) < padded:
            raise TruncatedTarError("archive ends inside a member's data")
        data = data[:size]
        kind = header[156:157]
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":
            long_name = _pax_path(data) or long_name
            continue
        if kind not in _REGULAR:
            long_name = None  # directories, links, global PAX headers: nothing to read
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar" and header[345] != 0:
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
        yield name, data


def split_key(name: str) -> tuple[str, str] | None:
    """``dir/KEY.ext.more`` → ``("dir/KEY", "ext.more")``; None for names without an extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def is_gopen_url(url: str) -> bool:
    """A URL that only webdataset's gopen reads (``pipe:``, ``http(s)://``, ...): a stream, with
    no directory to list or to look beside."""
    return url.startswith("pipe:") or (
        "://" in url and not url.startswith("file://") and not storage.is_remote(url)
    )


@contextlib.contextmanager
def open_tar(url: str) -> Iterator[BinaryIO]:
    """Open a shard for streaming: a local path, ``file://``, an object-store URL (``s3://``),
    or any URL webdataset's gopen reads (``pipe:``, ``http(s)://``, ...); ``.tar.gz`` / ``.tgz``
    are gunzipped."""
    with contextlib.ExitStack() as stack:
        if is_gopen_url(url):
            raw = stack.enter_context(contextlib.closing(gopen(url, "rb")))
        else:
            raw = stack.enter_context(storage.open_input(url))
        if url.endswith((".gz", ".tgz")):
            raw = stack.enter_context(gzip.GzipFile(fileobj=raw))
        yield raw
