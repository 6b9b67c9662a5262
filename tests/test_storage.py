"""Paths and object-store URLs behind one API, against local disk and a real S3 server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ssl_kd import atomic, storage
from ssl_kd.errors import UserError
from ssl_kd.shards import ReadStats, expand_shards, iter_shard, write_shards
from ssl_kd.shards.writer import ShardWriter


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A writable directory: a local one, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return storage.join(request.getfixturevalue("s3"), "root")


def test_join_name_parent() -> None:
    assert storage.join("s3://b/x/", "y", "z.tar") == "s3://b/x/y/z.tar"
    assert storage.join("/a/b", "c") == "/a/b/c"
    assert storage.name("s3://b/x/u-1.tar") == "u-1.tar"
    assert storage.parent("s3://b/x/u-1.tar") == "s3://b/x"
    assert storage.parent("/a/b/c") == "/a/b"
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/tmp/x")
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote("https://h/x")


def test_write_read_list_delete(root: str) -> None:
    assert not storage.exists(root) and storage.list_dir(root) == []
    atomic.write_text(storage.join(root, "a.json"), "{}\n")
    atomic.write_text(storage.join(root, "b.txt"), "hello")
    atomic.write_text(storage.join(root, "sub", "c.txt"), "deep")
    assert storage.read_text(storage.join(root, "b.txt")) == "hello"
    assert storage.is_dir(root) and storage.is_file(storage.join(root, "a.json"))
    assert not storage.is_file(root) and not storage.is_dir(storage.join(root, "a.json"))
    assert storage.list_dir(root) == [storage.join(root, "a.json"), storage.join(root, "b.txt")]
    assert storage.list_dir(root, "*.txt") == [storage.join(root, "b.txt")]
    assert storage.glob(storage.join(root, "*.json")) == [storage.join(root, "a.json")]
    storage.delete(storage.join(root, "a.json"))
    storage.delete(storage.join(root, "missing"))  # absent: no error
    assert not storage.exists(storage.join(root, "a.json"))
    storage.delete_tree(root)
    assert storage.list_dir(root) == [] and not storage.exists(storage.join(root, "sub", "c.txt"))


def test_version_changes_when_a_file_is_rewritten(root: str) -> None:
    path = storage.join(root, "v.txt")
    atomic.write_text(path, "one")
    first = storage.version(path)
    assert first == storage.version(path) and first.startswith("3:")
    time.sleep(1.1)  # object stores keep whole seconds
    atomic.write_text(path, "two")
    assert storage.version(path) != first
    with pytest.raises((UserError, OSError)):
        storage.version(storage.join(root, "missing.txt"))


def test_failed_atomic_write_leaves_nothing(root: str) -> None:
    target = storage.join(root, "out.bin")
    atomic.write_text(target, "old")
    staged: list[Path] = []
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        staged.append(tmp)
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert storage.read_text(target) == "old"  # the old object or file is untouched
    assert not staged[0].exists()
    assert storage.list_dir(root) == [target]  # no temp object or file left beside it


def test_shards_round_trip(root: str) -> None:
    samples = [{"__key__": f"k{i}", "cls": i % 3, "txt": f"t{i}"} for i in range(7)]
    written = write_shards(samples, storage.join(root, "s-%03d.tar"), 3)
    assert written == [storage.join(root, f"s-{i:03d}.tar") for i in range(3)]
    assert expand_shards(root) == written
    assert expand_shards(storage.join(root, "s-{000..002}.tar")) == written
    assert expand_shards(storage.join(root, "s-00[01].tar")) == written[:2]
    atomic.write_text(storage.join(root, "list.txt"), "# two\ns-000.tar\ns-002.tar\n")
    assert expand_shards(storage.join(root, "list.txt")) == [written[0], written[2]]
    stats = ReadStats()
    keys = [s["__key__"] for url in written for s in iter_shard(url, stats)]
    assert keys == [f"k{i}" for i in range(7)] and stats.skipped == 0
    with pytest.raises(UserError, match="do not exist"):
        expand_shards(storage.join(root, "s-{000..004}.tar"))


def test_aborted_shard_is_never_visible(root: str) -> None:
    with pytest.raises(RuntimeError), ShardWriter(storage.join(root, "s-%03d.tar"), 2) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "txt": "x"})
        raise RuntimeError("crash with shard 1 half written")
    assert storage.list_dir(root) == [storage.join(root, "s-000.tar")]


def test_unreachable_store_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage.clear_cache()
    try:
        with pytest.raises(UserError, match="s3://nowhere"):
            storage.list_dir("s3://nowhere/prefix")
        with pytest.raises(UserError, match="not supported"):
            storage.exists("s3://b/k?endpoint_override=127.0.0.1:9")
    finally:
        storage.clear_cache()
