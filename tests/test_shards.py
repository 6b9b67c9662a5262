"""Shard layer: atomic writing, round trips, spec expansion, bad samples skipped and counted."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_plain_tar

from ssl_kd.errors import ShardSpecError
from ssl_kd.models.preprocess import Preprocess, fit_size
from ssl_kd.shards import ReadStats, ShardWriter, encode_image, expand_shards, iter_samples
from ssl_kd.shards.dataset import ShardImageDataset, buffer_shuffle
from ssl_kd.shards.reader import decoded_samples


def _img(seed: int, shape: tuple = (8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def test_round_trip_keys_bytes_labels(tmp_path: Path) -> None:
    samples = [
        {"__key__": f"k{i:03d}", "png": encode_image(_img(i)), "cls": i % 3} for i in range(25)
    ]
    with ShardWriter(str(tmp_path / "s-%06d.tar"), samples_per_shard=10) as writer:
        for s in samples:
            writer.write(s)
    assert [Path(p).name for p in writer.written] == [f"s-00000{i}.tar" for i in range(3)]
    stats = ReadStats()
    got = list(iter_samples(expand_shards(str(tmp_path)), stats))
    assert [g["__key__"] for g in got] == [s["__key__"] for s in samples]
    assert [g["png"] for g in got] == [s["png"] for s in samples]
    assert [int(g["cls"]) for g in got] == [s["cls"] for s in samples]
    assert stats.skipped == 0
    assert not list(tmp_path.glob(".*tmp"))


def test_jpeg_and_rgb_round_trip(tmp_path: Path) -> None:
    rgb = _img(0, (16, 16, 3))
    with ShardWriter(str(tmp_path / "j-%06d.tar"), 5) as w:
        w.write({"__key__": "a", "jpg": encode_image(rgb, "jpeg"), "cls": 1})
    stats = ReadStats()
    ((key, img, label),) = decoded_samples(iter_samples(w.written, stats), stats, 3, labeled=True)
    assert (key, label, tuple(img.shape), img.dtype) == ("a", 1, (3, 16, 16), torch.uint8)


def test_failed_write_leaves_no_partial_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "s-%06d.tar"), 4) as w:
        for i in range(6):
            w.write({"__key__": f"k{i}", "png": encode_image(_img(i))})
        raise RuntimeError("crash mid-shard")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.tar"]


def test_writer_output_is_deterministic(tmp_path: Path) -> None:
    paths = []
    for run in ("a", "b"):
        with ShardWriter(str(tmp_path / run / "s-%06d.tar"), 10) as w:
            for i in range(5):
                w.write({"__key__": f"k{i}", "png": encode_image(_img(i)), "cls": i})
        paths.append(w.written[0])
    assert Path(paths[0]).read_bytes() == Path(paths[1]).read_bytes()


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    d = tmp_path / "shards"
    for i in range(4):
        with ShardWriter(str(d / "x-%06d.tar"), 10, start_index=i) as w:
            w.write({"__key__": f"k{i}", "png": encode_image(_img(i))})
    return d


def test_spec_brace_glob_dir_list_comma(shard_dir: Path, tmp_path: Path) -> None:
    expected = [str(shard_dir / f"x-{i:06d}.tar") for i in range(4)]
    assert expand_shards(str(shard_dir / "x-{000000..000003}.tar")) == expected
    assert expand_shards(str(shard_dir / "x-*.tar")) == expected
    assert expand_shards(str(shard_dir)) == expected
    listing = tmp_path / "shards.txt"
    listing.write_text("# shards\nshards/x-000002.tar\n\n" + expected[0] + "\n")
    assert expand_shards(str(listing)) == [expected[2], expected[0]]
    assert expand_shards(f"{expected[1]},{expected[3]}") == [expected[1], expected[3]]
    assert expand_shards("https://host/u-{0..2}.tar") == [
        f"https://host/u-{i}.tar" for i in range(3)
    ]


@pytest.mark.parametrize(
    "spec",
    ["nothing-*.tar", "x-{000010..000012}.tar", "missing-dir", "x-{000002..000005}.tar", ""],
)
def test_spec_that_matches_nothing_or_misses_files_is_an_error(shard_dir: Path, spec: str) -> None:
    with pytest.raises(ShardSpecError):
        expand_shards(str(shard_dir / spec) if spec else spec)


def test_list_file_with_missing_shard_is_an_error(tmp_path: Path) -> None:
    listing = tmp_path / "l.txt"
    listing.write_text("gone.tar\n")
    with pytest.raises(ShardSpecError, match="missing"):
        expand_shards(str(listing))


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    good = encode_image(_img(1))
    path = tmp_path / "bad.tar"
    write_plain_tar(
        path,
        {
            "a.png": good,
            "a.cls": b"1",
            "b.png": b"not an image",
            "b.cls": b"2",
            "c.cls": b"0",  # no image at all
            "d.json": b"{}",  # non-image member only
            "e.png": good,
            "e.cls": b"x",  # unparsable label
            "f.png": good,
            "f.cls": b"0",
        },
    )
    stats = ReadStats()
    got = list(decoded_samples(iter_samples([str(path)], stats), stats, 1, labeled=True))
    assert [(k, lab) for k, _, lab in got] == [("a", 1), ("f", 0)]
    assert stats.samples == 2 and stats.skipped == 4
    assert {e["key"] for e in stats.errors} == {"b", "c", "d", "e"}
    # Counted by stable reason code; the detail is plain text, without object reprs.
    assert stats.reasons == {"corrupt image": 1, "no image member": 2, "bad label": 1}
    assert not any("0x" in e["detail"] for e in stats.errors)


def test_truncated_tar_yields_what_it_can_and_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    write_plain_tar(path, {f"k{i}.png": encode_image(_img(i, (32, 32))) for i in range(6)})
    data = path.read_bytes()
    path.write_bytes(data[:5000])  # cut inside the third member's data
    stats = ReadStats()
    got = list(decoded_samples(iter_samples([str(path)], stats), stats, 1, labeled=False))
    assert 1 <= len(got) < 6
    assert stats.truncated_shards == {"t.tar"}


def test_img2dataset_layout_and_plain_tar(tmp_path: Path) -> None:
    rgb = _img(3, (12, 12, 3))
    path = tmp_path / "00000.tar"
    write_plain_tar(
        path,
        {
            "000000000.jpg": encode_image(rgb, "jpeg"),
            "000000000.json": json.dumps({"url": "http://x", "key": "000000000"}).encode(),
            "000000000.txt": b"a caption",
            "000000001.jpg": encode_image(rgb, "jpeg"),
            "000000001.json": b"{}",
            "000000001.txt": b"another",
        },
    )
    ds = ShardImageDataset(
        [str(path)], fit_size(Preprocess(3, 12)), 3, labeled=False, with_keys=True
    )
    items = list(ds)
    assert [k for k, _, _ in items] == ["000000000", "000000001"]
    assert items[0][1].shape == (3, 12, 12) and items[0][2] == -1


def test_dataset_epoch_order_is_deterministic_and_skip_resumes(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path / "s-%06d.tar"), 7) as w:
        for i in range(30):
            w.write({"__key__": f"k{i:02d}", "png": encode_image(_img(i)), "cls": 0})
    pp = Preprocess(1, 8)

    def keys(epoch: int, skip: int = 0) -> list[str]:
        ds = ShardImageDataset(
            w.written, fit_size(pp), 1, shuffle_buffer=10, seed=3, with_keys=True
        )
        ds.set_epoch(epoch, skip)
        return [k for k, _, _ in ds]

    e0 = keys(0)
    assert sorted(e0) == [f"k{i:02d}" for i in range(30)]
    assert e0 == keys(0) and e0 != keys(1)
    assert keys(0, skip=12) == e0[12:]


def test_buffer_shuffle_keeps_every_item() -> None:
    import random

    out = list(buffer_shuffle(range(100), 16, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_long_names_in_every_format(tmp_path: Path, fmt: int) -> None:
    deep = "d" * 60 + "/" + "e" * 60  # > 100 chars: GNU 'L', PAX 'path' or ustar prefix
    names = [f"{deep}/k{i}.{ext}" for i in range(2) for ext in ("png", "cls")]
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("dir-entry"), None)  # non-regular members are skipped
        for name in names:
            data = encode_image(_img(0)) if name.endswith("png") else b"3"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stats = ReadStats()
    got = list(iter_samples([str(path)], stats))
    assert [g["__key__"] for g in got] == [f"{deep}/k0", f"{deep}/k1"]
    assert all(g["cls"] == b"3" for g in got) and stats.skipped == 0


def test_tar_reader_gzip_and_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "z.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = encode_image(_img(1))
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    stats = ReadStats()
    assert [g["__key__"] for g in iter_samples([str(path)], stats)] == ["a"]
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    assert list(iter_samples([str(junk)], stats)) == []
    assert stats.reasons["unreadable shard"] == 1


def test_decoders_agree_and_pil_reads_other_formats() -> None:
    from PIL import Image

    from ssl_kd.shards.reader import decode_image

    rgb = _img(5, (9, 7, 3))
    as_png = decode_image(encode_image(rgb), 3)
    assert torch.equal(as_png, torch.from_numpy(rgb).permute(2, 0, 1))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="BMP")  # not a torchvision format: PIL fallback
    assert torch.equal(decode_image(buf.getvalue(), 3), as_png)
    assert decode_image(buf.getvalue(), 1).shape == (1, 9, 7)
    assert decode_image(buf.getvalue(), None).shape == (3, 9, 7)


def test_a_repeated_key_anywhere_in_a_shard_keeps_the_first_copy(tmp_path: Path) -> None:
    path = tmp_path / "dup.tar"
    first, second = encode_image(_img(1)), encode_image(_img(2))
    write_plain_tar(
        path,
        [
            ("d0.png", first),
            ("d0.png", second),  # adjacent repeat: a duplicate member
            ("d1.png", first),
            ("d2.png", first),
            ("d1.png", second),  # the same key again, not adjacent
            ("d1.cls", b"3"),
            ("d3.png", second),
        ],
    )
    stats = ReadStats()
    samples = list(iter_samples([str(path)], stats))
    assert [s["__key__"] for s in samples] == ["d0", "d1", "d2", "d3"]
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["d0"]["png"] == first and by_key["d1"]["png"] == first
    assert "cls" not in by_key["d1"]  # the second copy's members are dropped whole
    assert stats.reasons == {"duplicate member": 1, "duplicate key": 1}
    assert [e["key"] for e in stats.errors] == ["d0", "d1"]


def test_keys_that_could_escape_a_directory_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "keys.tar"
    good = encode_image(_img(0))
    names = ["../../evil", "/abs/key", "a/../../b", "sub/dir/ok", "fine"]
    write_plain_tar(path, [(f"{name}.png", good) for name in names])
    stats = ReadStats()
    keys = [s["__key__"] for s in iter_samples([str(path)], stats)]
    assert keys == ["sub/dir/ok", "fine"]
    assert stats.reasons == {"unsafe key": 3}
