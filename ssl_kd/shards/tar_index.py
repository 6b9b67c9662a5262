"""Random access to a few samples of a local WebDataset shard: index once, then seek.

:func:`index_members` walks the tar headers once (``tarfile`` seeks over member data instead of
reading it) and records where each wanted key's members start; :func:`read_images` then seeks to
each image in file order. A shard is thus read once at most, whatever number of its images are
wanted, and the walk stops as soon as every wanted key has been seen. A shard in an object store
is read forwards instead, once, up to the last wanted key.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path
from typing import BinaryIO

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.shards.reader import ReadStats, image_ext, iter_shard
from ssl_kd.shards.tario import split_key

Index = dict[str, dict[str, tuple[int, int]]]  # key → extension → (data offset, size)


def _open(path: str | Path) -> BinaryIO:
    # A gzip stream seeks too (by decompressing forward): reads in offset order stay one pass.
    if str(path).endswith((".gz", ".tgz")):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def index_members(stream: BinaryIO, wanted: set[str] | None = None) -> Index:
    """Offsets of the members of ``wanted`` keys (all keys when None), in one header walk."""
    index: Index = {}
    # Not a context manager: closing a TarFile built on ``fileobj`` leaves the stream open anyway.
    tar = tarfile.open(fileobj=stream, mode="r:")  # noqa: SIM115
    try:
        for info in tar:
            parts = split_key(info.name) if info.isreg() else None
            if parts is None:
                continue
            key, ext = parts
            if wanted is not None and key not in wanted:
                # The members of one key are consecutive (WebDataset), so once every wanted
                # key has been seen and another key starts, nothing wanted is left.
                if len(index) == len(wanted):
                    break
                continue
            index.setdefault(key, {})[ext] = (info.offset_data, info.size)
    except tarfile.TarError:
        pass  # a damaged tail: keys found before it are still readable; missing ones reported
    return index


def _read_streaming(url: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """The members of ``keys``, from one forward read (an object store serves a sequential
    read well and every seek badly); stops once all were seen."""
    found: dict[str, dict[str, bytes]] = {}
    stats = ReadStats()
    for sample in iter_shard(url, stats):
        if sample["__key__"] in keys:
            found[sample["__key__"]] = sample
            if len(found) == len(keys):
                break
    if not found and stats.errors:
        raise UserError(f"{url} is not a readable tar shard ({stats.errors[-1]['reason']})")
    return found


def _read_seeking(path: str | Path, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """The image member of each of ``keys`` found in a local shard: one header walk, then a
    seek to each image in file order."""
    try:
        stream = _open(path)
    except OSError as exc:
        raise UserError(f"cannot open shard {path}: {exc}") from None
    with stream:
        try:
            index = index_members(stream, keys)
        except tarfile.TarError as exc:
            raise UserError(f"{path} is not a readable tar shard ({exc})") from None
        places = []
        for key, members in index.items():
            ext = image_ext(members)
            if ext is not None:
                places.append((members[ext], key, ext))
        found: dict[str, dict[str, bytes]] = {key: {} for key in index}
        for (offset, size), key, ext in sorted(places):
            stream.seek(offset)
            found[key][ext] = stream.read(size)
    return found


def read_images(path: str | Path, keys: set[str]) -> dict[str, bytes]:
    """The encoded image of each of ``keys`` in the shard at ``path``; UserError if any is
    missing."""
    if storage.is_remote(path):
        found = _read_streaming(str(path), keys)
    else:
        found = _read_seeking(path, keys)
    missing = sorted(keys - found.keys())
    if missing:
        raise UserError(
            f"shard {path} has no sample {missing[0]!r}"
            + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": is it the shard that was labeled?"
        )
    images = {}
    for key in keys:
        ext = image_ext(found[key])
        if ext is None:
            raise UserError(f"sample {key!r} of {path} has no image member")
        images[key] = found[key][ext]
    return images
