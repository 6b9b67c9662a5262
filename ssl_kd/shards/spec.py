"""Shard specs → ordered lists of shard URLs.

A spec is a brace pattern (``data/u-{000000..000999}.tar``), a glob (``data/*.tar``), a text file
listing one shard per line (``#`` comments, paths relative to the list file), a directory (its
``*.tar`` files), or a single file, on local disk or in an object store (``s3://bucket/u-*.tar``;
wildcards in the file name only). ``http(s)://`` and ``pipe:`` URLs are brace-expanded but not
checked for existence. Comma-separated specs are concatenated.
"""

from __future__ import annotations

import os

import braceexpand

from ssl_kd import storage
from ssl_kd.errors import ShardSpecError
from ssl_kd.shards.tario import is_gopen_url

_LIST_SUFFIXES = (".txt", ".list", ".lst")
_SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _missing(names: list[str]) -> list[str]:
    """The names that are not files; one listing per directory for object stores."""
    listed: dict[str, set[str]] = {}
    missing = []
    for n in names:
        if is_gopen_url(n):  # not listable: checked when read
            continue
        if storage.is_remote(n):
            d = storage.parent(n)
            if d not in listed:
                listed[d] = set(storage.list_dir(d))
            if n not in listed[d]:
                missing.append(n)
        elif not os.path.isfile(n):
            missing.append(n)
    return missing


def _expand_one(spec: str) -> list[str]:
    if spec.startswith("file://"):
        spec = spec[len("file://") :]
    if is_gopen_url(spec):
        return list(braceexpand.braceexpand(spec))
    if "{" in spec and ".." in spec:
        names = list(braceexpand.braceexpand(spec))
        missing = _missing(names)
        if len(missing) == len(names):
            raise ShardSpecError(f"shard spec '{storage.display(spec)}' matched no files")
        if missing:
            raise ShardSpecError(
                f"shard spec '{storage.display(spec)}' names {len(names)} shards but "
                f"{len(missing)} do not exist (first missing: {storage.display(missing[0])})"
            )
        return names
    if any(ch in spec for ch in "*?["):
        return storage.glob(spec)
    if storage.is_dir(spec):
        return storage.list_dir(spec, "*.tar")
    if storage.is_file(spec) and spec.endswith(_LIST_SUFFIXES):
        return _read_list_file(spec)
    if storage.is_file(spec):
        return [spec]
    raise ShardSpecError(
        f"shard spec '{storage.display(spec)}' matched no files (no such file or directory)"
    )


def _read_list_file(path: str) -> list[str]:
    out: list[str] = []
    for line in storage.read_text(path).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" in line or is_gopen_url(line) or os.path.isabs(line):
            out.append(line)
        else:
            out.append(storage.join(storage.parent(path), line))
    missing = _missing(out)
    if missing:
        raise ShardSpecError(
            f"shard list {storage.display(path)} names {len(missing)} missing shard(s) "
            f"(first: {storage.display(missing[0])})"
        )
    return out


def expand_shards(spec: str | list[str]) -> list[str]:
    """Expand a spec (or list of specs) into shard URLs; raises ShardSpecError if none match."""
    specs = spec if isinstance(spec, list) else [s for s in spec.split(",") if s.strip()]
    if not specs:
        raise ShardSpecError("shard spec is empty: give a directory, pattern, glob or list file")
    urls: list[str] = []
    for s in specs:
        found = _expand_one(s.strip())
        if not found:
            raise ShardSpecError(f"shard spec '{s}' matched no files")
        urls.extend(found)
    return urls


def shard_name(url: str) -> str:
    """The shard's file name (``u-000012.tar``): its identity in label and truth files."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def shard_stem(url: str) -> str:
    """``…/u-000012.tar`` → ``u-000012``: the shard's name without its tar suffix."""
    name = shard_name(url)
    for suffix in _SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
