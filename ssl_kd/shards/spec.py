"""Shard specs → ordered lists of shard URLs.

A spec is a brace pattern (``data/u-{000000..000999}.tar``), a glob (``data/*.tar``), a text file
listing one shard per line (``#`` comments, paths relative to the list file), a directory (its
``*.tar`` files), or a single file. Object-store URLs (``s3://…``) are brace-expanded but not
checked for existence here. Comma-separated specs are concatenated.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import braceexpand

from ssl_kd.errors import ShardSpecError

_LIST_SUFFIXES = (".txt", ".list", ".lst")


def _is_remote(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def _expand_one(spec: str) -> list[str]:
    if spec.startswith("file://"):
        spec = spec[len("file://") :]
    if _is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    if "{" in spec and ".." in spec:
        names = list(braceexpand.braceexpand(spec))
        missing = [n for n in names if not os.path.isfile(n)]
        if len(missing) == len(names):
            raise ShardSpecError(f"shard spec '{spec}' matched no files")
        if missing:
            raise ShardSpecError(
                f"shard spec '{spec}' names {len(names)} shards but {len(missing)} do not exist "
                f"(first missing: {missing[0]})"
            )
        return names
    if any(ch in spec for ch in "*?["):
        return sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    path = Path(spec)
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar") if p.is_file())
    if path.is_file() and path.suffix in _LIST_SUFFIXES:
        return _read_list_file(path)
    if path.is_file():
        return [spec]
    raise ShardSpecError(f"shard spec '{spec}' matched no files (no such file or directory)")


def _read_list_file(path: Path) -> list[str]:
    out: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _is_remote(line) or os.path.isabs(line):
            out.append(line)
        else:
            out.append(str(path.parent / line))
    missing = [p for p in out if not _is_remote(p) and not os.path.isfile(p)]
    if missing:
        raise ShardSpecError(
            f"shard list {path} names {len(missing)} missing shard(s) (first: {missing[0]})"
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
