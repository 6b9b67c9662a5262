"""``ssl-kd inspect``: numbers against direct pyarrow/numpy computations, pictures, bad input."""

from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_teacher, write_plain_tar, write_unlabeled_shards
from PIL import Image

from ssl_kd.cli import main
from ssl_kd.errors import UserError
from ssl_kd.inspect.compare import compare_labels
from ssl_kd.inspect.labels import (
    class_top,
    find_key,
    open_labels,
    resolve_class,
    summarize_labels,
)
from ssl_kd.inspect.selection import summarize_selection
from ssl_kd.label.files import LabelMeta, build_table, write_labels
from ssl_kd.label.run import LabelConfig, run_label
from ssl_kd.select.run import SelectConfig, run_select
from ssl_kd.shards import ReadStats, encode_image, iter_shard, tar_index

C, K = 5, 3
META = LabelMeta(
    num_classes=C,
    classes=["cat", "dog", "3", "owl", "eel"],
    k=K,
    temperature=2.0,
    teacher_arch="cnn",
    teacher_sha256="ab" * 32,
    preprocess={},
)


def _synthetic(root: Path, files: int = 3, rows: int = 40, seed: int = 0) -> None:
    """Random labels on a coarse probability grid (ties) with class 4 rare as top-1."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        classes = np.stack([rng.permutation(C)[:K] for _ in range(rows)])
        classes[classes[:, 0] == 4] = [0, 4, 1]  # class 4 is top-1 nowhere...
        classes[:2, :] = [4, 0, 1]  # ...but in two rows per file
        raw = rng.integers(1, 9, (rows, K)) / 10
        probs = -np.sort(-raw, axis=1)
        keys = [f"k{i:03d}" for i in rng.permutation(rows)]
        table = build_table(META, f"u-{f:03d}.tar", keys, classes, probs)
        write_labels(table, root / f"u-{f:03d}.parquet")


def _direct(root: Path) -> dict[str, np.ndarray]:
    """Top-1 class and probability, stored probabilities, shard and key, straight from files."""
    t = pa.concat_tables(
        pq.read_table(p).replace_schema_metadata(None) for p in sorted(root.glob("*.parquet"))
    )
    classes = np.array(t.column("topk_class").to_pylist())
    probs = np.array(t.column("topk_prob").to_pylist(), dtype=np.float64)
    return {
        "classes": classes,
        "probs": probs,
        "shard": np.array(t.column("shard").to_pylist()),
        "key": np.array(t.column("key").to_pylist()),
    }


def _entropy(row: np.ndarray) -> float:
    p = row / row.sum()
    return -sum(x * math.log(x) for x in p if x > 0)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(["-q", *argv])
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, _, err = _run(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("ssl-kd: error:")]
    assert code == 2 and len(lines) == 1, (argv, err)
    return lines[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real labels of two teachers over 3 shards (+ one with a corrupt image), a selection."""
    root = tmp_path_factory.mktemp("inspect")
    shards = root / "shards"
    shards.mkdir()
    write_unlabeled_shards(shards, n_shards=3, per_shard=20)
    good = encode_image(np.full((16, 16), 77, np.uint8))
    write_plain_tar(shards / "u-000003.tar", {"bad-0.png": b"\x89PNG broken", "ok-0.png": good})
    out = {"root": root, "shards": shards}
    for name, seed in (("labels", 0), ("labels_b", 1)):
        teacher = make_teacher(root / f"{name}.pt", seed=seed)
        cfg = LabelConfig(
            teacher=str(teacher),
            shards=str(shards),
            out=str(root / name),
            k=3,
            executor="local",
            device="cpu",
        )
        run_label(cfg, progress=False)
        out[name] = root / name
    run_select(
        SelectConfig(
            labels=str(root / "labels"),
            out=str(root / "sel"),
            per_class=8,
            top_p=2,
            upsample=True,
            executor="local",
        )
    )
    out["sel"] = root / "sel"
    return out


def test_summary_matches_direct_computation(tmp_path: Path) -> None:
    _synthetic(tmp_path / "l")
    write_labels(
        build_table(META, "u-009.tar", [], np.zeros((0, K)), np.zeros((0, K))),
        tmp_path / "l" / "u-009.parquet",
    )
    errors = [
        {"shard": "u-000.tar", "key": "x", "reason": "corrupt image: bad"},
        {"shard": "u-001.tar", "key": "y", "reason": "corrupt image: worse"},
        {"shard": "u-001.tar", "key": "", "reason": "truncated tar: short"},
    ]
    (tmp_path / "l" / "u-001.errors.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in errors)
    )
    s = summarize_labels(open_labels(tmp_path / "l"), batch_rows=7)  # batches cross files
    d = _direct(tmp_path / "l")
    top1, conf = d["classes"][:, 0], d["probs"][:, 0]
    ent = np.array([_entropy(r) for r in d["probs"]])
    assert (s["files"], s["empty_files"], s["rows"], s["shards"]) == (4, 1, 120, 3)
    assert (s["num_classes"], s["k"], s["temperature"], s["teacher_arch"]) == (C, K, 2.0, "cnn")
    size = sum(p.stat().st_size for p in (tmp_path / "l").glob("*.parquet"))
    assert s["bytes_per_image"] == round(size / 120, 2)
    assert s["errors"] == {
        "total": 3,
        "shards": 2,
        "by_reason": {"corrupt image": 2, "truncated tar": 1},
    }
    assert [p["top1"] for p in s["per_class"]] == np.bincount(top1, minlength=C).tolist()
    for p in s["per_class"]:
        mine = top1 == p["class"]
        assert p["confidence"] == pytest.approx(conf[mine].mean(), rel=1e-6)
        assert p["entropy"] == pytest.approx(ent[mine].mean(), rel=1e-5)
    assert s["confidence"]["mean"] == pytest.approx(conf.mean())
    assert s["entropy"]["mean"] == pytest.approx(ent.mean(), rel=1e-5)
    assert s["entropy"]["max"] == pytest.approx(math.log(K))
    hist = s["confidence"]["histogram"]
    assert sum(hist["counts"]) == 120
    expected = np.histogram(conf, bins=np.asarray(hist["edges"]))[0]
    assert hist["counts"] == expected.tolist()


def test_class_top_key_lookup_and_class_names(tmp_path: Path) -> None:
    _synthetic(tmp_path / "l")
    labels = open_labels(tmp_path / "l")
    d = _direct(tmp_path / "l")
    assert resolve_class(META, "dog") == 1 and resolve_class(META, "4") == 4
    assert resolve_class(META, "3") == 2  # a class named "3" wins over index 3
    for cls, n in [(0, 5), (1, 100), (4, 10)]:
        view = class_top(labels, cls, n, batch_rows=9)
        mine = np.nonzero(d["classes"][:, 0] == cls)[0]
        brute = sorted(mine, key=lambda i: (-d["probs"][i, 0], d["shard"][i], d["key"][i]))[:n]
        got = [(r["shard"], r["key"]) for r in view["top"]]
        assert got == [(d["shard"][i], d["key"][i]) for i in brute]
        assert view["images"] == len(mine)
        assert [r["rank"] for r in view["top"]] == list(range(len(brute)))
    found = find_key(labels, "k007")  # every file holds k000..k039: one match per shard
    assert [m["shard"] for m in found["matches"]] == ["u-000.tar", "u-001.tar", "u-002.tar"]
    rows = np.nonzero(d["key"] == "k007")[0]
    for m, i in zip(found["matches"], rows, strict=True):
        assert m["topk_class"] == d["classes"][i].tolist()
        assert m["topk_name"] == [META.classes[c] for c in d["classes"][i]]
        np.testing.assert_allclose(m["topk_prob"], d["probs"][i], atol=1e-4)
    with pytest.raises(UserError, match="key 'nope' is in none of the 3 label files"):
        find_key(labels, "nope")
    for bad in ["wolf", "5", "-1"]:
        with pytest.raises(UserError, match="unknown class"):
            resolve_class(META, bad)


def test_compare_joins_on_shard_and_key(tmp_path: Path) -> None:
    _synthetic(tmp_path / "a", files=3)
    _synthetic(tmp_path / "b", files=4, seed=0)  # same as a for u-000..u-002, plus u-003
    # b: u-001 loses its first 5 rows, and 7 rows of u-000 change their top-1 to class 3
    t = pq.read_table(tmp_path / "b" / "u-001.parquet")
    write_labels(t.slice(5), tmp_path / "b" / "u-001.parquet")
    t = pq.read_table(tmp_path / "b" / "u-000.parquet")
    classes = np.array(t.column("topk_class").to_pylist())
    changed = [i for i in range(len(classes)) if classes[i, 0] != 3][:7]
    classes[changed] = [3, 0, 1]
    probs = np.array(t.column("topk_prob").to_pylist())
    write_labels(
        build_table(META, "u-000.tar", t.column("key").to_pylist(), classes, probs),
        tmp_path / "b" / "u-000.parquet",
    )
    # the join follows the shard column, not file names
    (tmp_path / "a" / "u-002.parquet").rename(tmp_path / "a" / "renamed.parquet")
    v = compare_labels(open_labels(tmp_path / "a"), open_labels(tmp_path / "b"))

    a, b = _direct(tmp_path / "a"), _direct(tmp_path / "b")
    top_b = {(s, k): c for s, k, c in zip(b["shard"], b["key"], b["classes"][:, 0], strict=True)}
    pairs = [
        (c, top_b[s, k])
        for s, k, c in zip(a["shard"], a["key"], a["classes"][:, 0], strict=True)
        if (s, k) in top_b
    ]
    assert v["matched"] == len(pairs) == 115
    assert (v["only_a"], v["only_b"]) == (5, 40)
    assert v["agree"] == sum(x == y for x, y in pairs) == 115 - 7
    assert v["agreement"] == pytest.approx(108 / 115)
    for p in v["per_class"]:
        mine = [(x, y) for x, y in pairs if x == p["class"]]
        assert (p["n_a"], p["agree"]) == (len(mine), sum(x == y for x, y in mine))
        assert p["n_b"] == sum(y == p["class"] for _, y in pairs)
    assert sum(c["images"] for c in v["confusions"]) == 7
    assert {c["b"] for c in v["confusions"]} == {3}

    other = replace(META, classes=["a", "b", "c", "d", "e"])
    write_labels(
        build_table(other, "x.tar", ["x"], np.zeros((1, K)), np.ones((1, K))),
        tmp_path / "c" / "x.parquet",
    )
    with pytest.raises(UserError, match="label different classes"):
        compare_labels(open_labels(tmp_path / "a"), open_labels(tmp_path / "c"))


def test_selection_counts_match_the_files(tmp_path: Path) -> None:
    _synthetic(tmp_path / "l")
    report = run_select(
        SelectConfig(
            labels=str(tmp_path / "l"),
            out=str(tmp_path / "s"),
            per_class=10,
            top_p=1,
            upsample=True,
            executor="local",
        )
    )
    v = summarize_selection(tmp_path / "s", batch_rows=4)
    t = pq.read_table(tmp_path / "s" / "selection.parquet")
    cls = t.column("class").to_numpy()
    score = t.column("score").to_numpy()
    rep = t.column("repeat").to_numpy()
    assert v["selected"] == len(cls) and v["with_repeats"] == int(rep.sum())
    assert v["per_class_k"] == 10 and v["top_p"] == 1 and v["report_mismatch"] == []
    assert v["upsampled_classes"] == 1  # class 4: 6 candidates, each repeated to reach 10
    for p, r in zip(v["per_class"], report["per_class"], strict=True):
        mine = cls == p["class"]
        assert p["selected"] == mine.sum() == r["selected"]
        assert p["with_repeats"] == rep[mine].sum() == r["with_repeats"]
        assert p["upsampled"] == p["with_repeats"] - p["selected"]
        assert p["min_score"] == pytest.approx(score[mine].min())
        assert p["mean_score"] == pytest.approx(score[mine].mean())
        assert p["candidates"] == r["candidates"] and p["short"] == (mine.sum() < 10)
        assert p["duplicates_removed"] == 0 and p["leaked_removed"] == 0
    assert v["per_class"][4]["selected"] == 6 and v["per_class"][4]["with_repeats"] == 10

    (tmp_path / "s" / "report.json").unlink()  # optional: counts stay, removals unknown
    bare = summarize_selection(tmp_path / "s")
    assert bare["selected"] == v["selected"] and bare["duplicates_removed"] is None


def test_cli_views(pipeline: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    labels = str(pipeline["labels"])
    code, out, _ = _run(["inspect", "labels", labels], capsys)
    assert code == 0
    assert "4 files (0 empty), 61 images, 4 shards" in out
    assert "errors recorded: 1 in 1 shards (corrupt image: 1)" in out
    assert re.search(r"^c0 +\d+ ", out, re.M) and "teacher cnn sha256:" in out

    code, out, _ = _run(["inspect", "labels", labels, "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["view"] == "summary" and doc["rows"] == 61
    assert sum(p["top1"] for p in doc["per_class"]) == 61

    busiest = max(doc["per_class"], key=lambda p: p["top1"])
    code, out, _ = _run(
        ["inspect", "labels", labels, "--class", busiest["name"], "--top", "3", "--json"], capsys
    )
    view = json.loads(out)
    assert view["images"] == busiest["top1"] and len(view["top"]) == 3
    scores = [r["score"] for r in view["top"]]
    assert scores == sorted(scores, reverse=True)
    code, out, _ = _run(["inspect", "labels", labels, "--class", str(busiest["class"])], capsys)
    assert code == 0 and f"class {busiest['class']} '{busiest['name']}'" in out

    code, out, _ = _run(["inspect", "labels", labels, "--key", "img-000021"], capsys)
    assert code == 0 and "1 match(es)" in out and "shard u-000001.tar" in out

    code, out, _ = _run(
        ["inspect", "labels", labels, "--compare", str(pipeline["labels_b"])], capsys
    )
    assert code == 0 and "matched 61 images on (shard, key)" in out
    code, out, _ = _run(["inspect", "labels", labels, "--compare", labels, "--json"], capsys)
    assert json.loads(out)["agreement"] == 1.0

    code, out, _ = _run(["inspect", "selection", str(pipeline["sel"])], capsys)
    assert code == 0 and re.search(
        r"^selection .*: \d+ images \(\d+ with repeats\), K=8, P=2", out, re.M
    )
    code, out, _ = _run(["inspect", "selection", str(pipeline["sel"]), "--json"], capsys)
    sel = json.loads(out)
    assert sel["selected"] == pq.read_metadata(pipeline["sel"] / "selection.parquet").num_rows


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # decodes every pixel
        return img.size


def test_plots(
    pipeline: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = _run(
        [
            "inspect",
            "labels",
            str(pipeline["labels"]),
            "--key",
            "img-000001",
            "--plots",
            str(tmp_path / "p"),
            "--json",
        ],
        capsys,
    )
    assert code == 0
    assert json.loads(out)["plots"] == [
        str(tmp_path / "p" / "class_histogram.png"),
        str(tmp_path / "p" / "confidence_histogram.png"),
    ]
    code, out, _ = _run(
        ["inspect", "selection", str(pipeline["sel"]), "--plots", str(tmp_path / "p")], capsys
    )
    assert code == 0 and "selection_counts.png" in out
    for name in ["class_histogram", "confidence_histogram", "selection_counts"]:
        width, height = _png(tmp_path / "p" / f"{name}.png")
        assert width > 300 and height > 200


def test_contact_sheets_read_each_shard_once(
    pipeline: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    walks: list[str] = []
    real = tar_index.index_members

    def counting(stream, wanted=None):  # type: ignore[no-untyped-def]
        walks.append(stream.name)
        return real(stream, wanted)

    monkeypatch.setattr(tar_index, "index_members", counting)
    labels = str(pipeline["labels"])
    doc = json.loads(_run(["inspect", "labels", labels, "--json"], capsys)[1])
    busiest = max(doc["per_class"], key=lambda p: p["top1"])["name"]
    code, out, _ = _run(
        [
            "inspect",
            "labels",
            labels,
            "--contact-sheet",
            busiest,
            "--top",
            "12",
            "--out",
            str(tmp_path / "l.png"),
            "--json",
        ],
        capsys,
    )
    assert code == 0, out
    view = json.loads(out)  # a summary view, plus the sheet
    assert view["contact_sheet"] == str(tmp_path / "l.png")
    assert _png(tmp_path / "l.png")[0] > 200
    top = class_top(open_labels(labels), resolve_class(open_labels(labels).meta, busiest), 12)
    shards = {r["shard"] for r in top["top"]}
    assert sorted(Path(w).name for w in walks) == sorted(shards)  # one walk per shard

    sel = pipeline["sel"]
    report = json.loads((sel / "report.json").read_text())
    cls = next(p["class"] for p in report["per_class"] if p["selected"])
    code, out, err = _run(
        [
            "inspect",
            "selection",
            str(sel),
            "--contact-sheet",
            str(cls),
            "--out",
            str(tmp_path / "s.png"),
            "--top",
            "4",
        ],
        capsys,
    )
    assert code == 0, err
    assert f"contact sheet: {tmp_path / 's.png'}" in out and _png(tmp_path / "s.png")[0] > 100
    code, _, err = _run(
        [
            "inspect",
            "selection",
            str(sel),
            "--contact-sheet",
            str(cls),
            "--out",
            str(tmp_path / "t.png"),
            "--shards",
            str(pipeline["shards"]),
        ],
        capsys,
    )
    assert code == 0, err


def test_tar_index_reads_exact_bytes_plain_and_gzip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    members = {}
    for i in range(30):
        members[f"dir/s{i:03d}.png"] = encode_image(rng.integers(0, 255, (8, 8), np.uint8))
        members[f"dir/s{i:03d}.json"] = b"{}"
    write_plain_tar(tmp_path / "a.tar", members)
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    want = {"dir/s003", "dir/s017", "dir/s010"}
    for name in ["a.tar", "a.tar.gz"]:
        got = tar_index.read_images(tmp_path / name, want)
        assert got == {k: members[f"{k}.png"] for k in want}
    with open(tmp_path / "a.tar", "rb") as fh:
        index = tar_index.index_members(fh, {"dir/s001"})
    assert set(index) == {"dir/s001"} and set(index["dir/s001"]) == {"png", "json"}
    samples = {s["__key__"]: s["png"] for s in iter_shard(str(tmp_path / "a.tar"), ReadStats())}
    assert tar_index.read_images(tmp_path / "a.tar", set(samples)) == samples
    with pytest.raises(UserError, match="has no sample 'dir/zzz'"):
        tar_index.read_images(tmp_path / "a.tar", {"dir/zzz"})
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(UserError, match="not a readable tar shard"):
        tar_index.read_images(tmp_path / "junk.tar", {"x"})


def test_bad_input_is_one_error_line(
    pipeline: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = str(pipeline["labels"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.parquet").write_bytes(b"this is not parquet")
    assert "not a readable Parquet file" in _error(
        ["inspect", "labels", str(tmp_path / "junk")], capsys
    )
    (tmp_path / "plain").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain" / "a.parquet")
    assert "not an ssl_kd label file" in _error(
        ["inspect", "labels", str(tmp_path / "plain")], capsys
    )
    (tmp_path / "cols").mkdir()
    pq.write_table(pa.table({"key": ["a"]}, metadata=META.to_kv()), tmp_path / "cols" / "a.parquet")
    assert "has no 'shard' column" in _error(["inspect", "labels", str(tmp_path / "cols")], capsys)
    (tmp_path / "types").mkdir()
    ints = pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3], pa.int8()), K)
    bad = pa.table(
        {"key": ["a"], "shard": ["s"], "topk_class": ints, "topk_prob": ints}, metadata=META.to_kv()
    )
    pq.write_table(bad, tmp_path / "types" / "a.parquet")
    line = _error(["inspect", "labels", str(tmp_path / "types")], capsys)
    assert (
        "column 'topk_prob' is fixed_size_list<" in line
        and "expected fixed_size_list<float>[3]" in line
    )
    assert "is a file" in _error(
        ["inspect", "labels", str(tmp_path / "junk" / "a.parquet")], capsys
    )
    assert "does not exist" in _error(["inspect", "labels", str(tmp_path / "none")], capsys)

    assert "key 'zzz' is in none" in _error(["inspect", "labels", labels, "--key", "zzz"], capsys)
    assert "unknown class 'wolf'" in _error(
        ["inspect", "labels", labels, "--class", "wolf"], capsys
    )
    assert "index 0..3" in _error(["inspect", "labels", labels, "--class", "7"], capsys)
    assert "not allowed with argument" in _error(
        ["inspect", "labels", labels, "--class", "1", "--key", "k"], capsys
    )
    assert "--top must be >= 1" in _error(["inspect", "labels", labels, "--top", "0"], capsys)
    assert "go together" in _error(["inspect", "labels", labels, "--contact-sheet", "c1"], capsys)
    assert "not a readable Parquet file" in _error(
        ["inspect", "labels", labels, "--compare", str(tmp_path / "junk")], capsys
    )

    _synthetic(tmp_path / "synth", files=1)  # no config.yaml: shards unknown
    sheet = ["--contact-sheet", "cat", "--out", str(tmp_path / "x.png")]
    assert "pass --shards" in _error(["inspect", "labels", str(tmp_path / "synth"), *sheet], capsys)
    elsewhere = tmp_path / "other_shards"
    elsewhere.mkdir()
    write_unlabeled_shards(elsewhere, n_shards=1, per_shard=2)
    (elsewhere / "u-000000.tar").rename(elsewhere / "v-000000.tar")
    line = _error(
        ["inspect", "labels", str(tmp_path / "synth"), *sheet, "--shards", str(elsewhere)], capsys
    )
    assert "shard u-000.tar is not among the 1 shards" in line

    assert "holds no selection.parquet" in _error(["inspect", "selection", labels], capsys)
    (tmp_path / "sel").mkdir()
    (tmp_path / "sel" / "selection.parquet").write_bytes(b"junk")
    assert "not a readable Parquet file" in _error(
        ["inspect", "selection", str(tmp_path / "sel")], capsys
    )
    assert not (tmp_path / "x.png").exists()


def _readme_section() -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    return re.split(r"\n##+ ", readme.split("### Inspecting labels", 1)[1], maxsplit=1)[0]


def test_readme_duckdb_and_pandas_queries(pipeline: dict[str, Path]) -> None:
    duckdb = pytest.importorskip("duckdb")
    section = _readme_section()
    queries = re.findall(r'duckdb\.sql\("""(.*?)"""\)', section, re.S)
    assert len(queries) == 2

    def paths(text: str) -> str:
        text = text.replace("runs/demo/round1/labels", str(pipeline["labels"]))
        return text.replace("runs/demo/round1/selection", str(pipeline["sel"]))

    d = _direct(pipeline["labels"])
    top1, conf = d["classes"][:, 0], d["probs"][:, 0]
    rows = duckdb.sql(paths(queries[0])).fetchall()
    assert [r[0] for r in rows] == sorted(set(top1.tolist()))
    for cls, images, confidence in rows:
        assert images == (top1 == cls).sum()
        assert confidence == pytest.approx(conf[top1 == cls].mean(), rel=1e-6)

    sel = pq.read_table(pipeline["sel"] / "selection.parquet")
    s_cls, s_score = sel.column("class").to_numpy(), sel.column("score").to_numpy()
    s_rep = sel.column("repeat").to_numpy()
    rows = duckdb.sql(paths(queries[1])).fetchall()
    assert [r[0] for r in rows] == sorted(set(s_cls.tolist()))
    for cls, selected, with_repeats, lo, mean in rows:
        mine = s_cls == cls
        assert (selected, with_repeats) == (mine.sum(), s_rep[mine].sum())
        assert lo == pytest.approx(s_score[mine].min()) and mean == pytest.approx(
            s_score[mine].mean()
        )

    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    pandas_blocks = [b for b in blocks if "import pandas" in b]
    assert len(pandas_blocks) == 1
    scope: dict = {}
    exec(paths(pandas_blocks[0]).replace("print(", "(lambda *a: None)("), scope)
    per_class, per_selected = scope["per_class"], scope["per_selected"]
    assert per_class["images"].to_dict() == {c: (top1 == c).sum() for c in set(top1.tolist())}
    for c, mean in per_class["confidence"].items():
        assert mean == pytest.approx(conf[top1 == c].mean(), rel=1e-6)
    assert per_selected["selected"].to_dict() == {
        c: (s_cls == c).sum() for c in set(s_cls.tolist())
    }
