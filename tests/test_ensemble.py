"""Teacher ensembles and test-time augmentation: the averaged distribution by hand, one
checkpoint for label and evaluate, provenance in the label files, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    make_teacher,
    run_cli,
    separable_images,
    write_labeled_shards,
    write_unlabeled_shards,
)

from ssl_kd.label.files import label_files, read_meta
from ssl_kd.models.checkpoint import load_checkpoint, model_from_checkpoint
from ssl_kd.models.ensemble import Ensemble, tta_views
from ssl_kd.models.preprocess import Preprocess, normalize
from ssl_kd.models.registry import count_parameters
from ssl_kd.shards import ReadStats, expand_shards, iter_samples
from ssl_kd.shards.decode import decode_image

K = 3
PRETRAIN = ["pretrain", "--num-classes", "4", "--data"]


def test_views_and_the_mean_distribution_by_hand() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    views = tta_views(x, ("flip", "shift"), 1)
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[1], x.flip(-1))
    # The first shift moves the image 1 px down and right, the border repeated.
    shifted = views[2]
    assert torch.equal(shifted[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(shifted[..., 0, 1:], x[..., 0, :-1])
    assert torch.equal(views[5][..., :-1, :-1], x[..., 1:, 1:])  # and 1 px up and left

    torch.manual_seed(0)
    a, b = torch.nn.Linear(36, 4), torch.nn.Linear(36, 4)
    members = [torch.nn.Sequential(torch.nn.Flatten(), m) for m in (a, b)]
    ens = Ensemble(members, ("flip",))
    by_hand = sum(
        torch.softmax(m(v), dim=1) for m in members for v in (x, x.flip(-1))
    ) / 4  # fmt: off
    assert torch.allclose(ens.probabilities(x), by_hand, atol=1e-6)
    assert torch.allclose(torch.softmax(ens(x), dim=1), by_hand, atol=1e-6)
    with pytest.raises(ValueError, match="choose from flip, shift"):
        Ensemble(members, ("rotate",))


def _probs(ckpts: list[Path], image: torch.Tensor, views: tuple[str, ...]) -> np.ndarray:
    """The mean softmax of the checkpoints' models over the views of one image."""
    pp = Preprocess(1, 16)
    x = normalize(image[None], pp)
    total = 0
    count = 0
    for ckpt in ckpts:
        model, _ = model_from_checkpoint(load_checkpoint(ckpt))
        model.eval()
        for view in tta_views(x, views, 1):
            with torch.inference_mode():
                total = total + torch.softmax(model(view), dim=1)[0].double()
            count += 1
    return (total / count).numpy()


def _label(teacher: Path, shards: Path, out: Path) -> list[str]:
    return [
        "label",
        "--teacher",
        str(teacher),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--executor",
        "local",
    ]


def _labels(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rows = {}
    for path in label_files(out):
        t = pq.read_table(path).to_pydict()
        for key, cls, prob in zip(t["key"], t["topk_class"], t["topk_prob"], strict=True):
            rows[key] = (np.array(cls), np.array(prob, np.float64))
    return rows


def test_an_ensemble_checkpoint_labels_and_evaluates_as_its_members_averaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = make_teacher(tmp_path / "a.pt", "cnn", seed=1)
    b = make_teacher(tmp_path / "b.pt", "cnn_deep", seed=2)
    shards = tmp_path / "u"
    write_unlabeled_shards(shards, 2, 6)
    ens = tmp_path / "ens.pt"
    argv = ["ensemble", "--members", str(a), str(b), "--tta", "flip", "--out", str(ens)]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "ensemble of 2 (cnn, cnn_deep) over the image + flip" in out

    code, _, err = run_cli(
        [*_label(ens, shards, tmp_path / "l"), "--k", str(K)],
        capsys,
    )
    assert code == 0, err
    rows = _labels(tmp_path / "l")
    images = {
        s["__key__"]: decode_image(s["png"], 1)
        for s in iter_samples(expand_shards(str(shards)), ReadStats())
    }
    assert set(rows) == set(images)
    for key, (cls, prob) in rows.items():
        p = _probs([a, b], images[key], ("flip",))
        np.testing.assert_allclose(prob, p[cls], atol=2e-3)
        assert list(cls) == list(np.argsort(-p)[:K])
    meta = read_meta(label_files(tmp_path / "l")[0])
    assert meta.teacher_arch == "ensemble" and meta.extra["tta"] == ["flip"]
    members = meta.extra["members"]
    assert [m["arch"] for m in members] == ["cnn", "cnn_deep"]
    assert all(len(m["sha256"]) == 64 for m in members)

    # Evaluated as one classifier: the mean distribution's top-1; its size is every member's.
    test = tmp_path / "t"
    test.mkdir()
    x, y = separable_images(6, 4, 16, seed=3)
    write_labeled_shards(test, "t", x, y, per_shard=32)
    (test / "dataset.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(4)]}))
    report = tmp_path / "m.json"
    argv = ["evaluate", "--checkpoint", str(ens), "--data", str(test), "--out", str(report)]
    code, _, err = run_cli([*argv, "--latency", "false"], capsys)
    assert code == 0, err
    metrics = json.loads(report.read_text())
    by_hand = np.mean(
        [
            np.argmax(_probs([a, b], torch.from_numpy(img)[None], ("flip",))) == label
            for img, label in zip(x, y, strict=True)
        ]
    )
    assert metrics["top1"] == pytest.approx(by_hand)
    sizes = [count_parameters(model_from_checkpoint(load_checkpoint(p))[0]) for p in (a, b)]
    assert metrics["model"]["params"] == sum(sizes)


def test_tta_on_one_teacher_and_bad_ensembles_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = make_teacher(tmp_path / "a.pt", "cnn", seed=1)
    shards = tmp_path / "u"
    write_unlabeled_shards(shards, 1, 5)
    code, _, err = run_cli(
        [*_label(a, shards, tmp_path / "l"), "--k", str(K), "--tta", "flip", "shift"],
        capsys,
    )
    assert code == 0, err
    images = {
        s["__key__"]: decode_image(s["png"], 1)
        for s in iter_samples(expand_shards(str(shards)), ReadStats())
    }
    for key, (cls, prob) in _labels(tmp_path / "l").items():
        np.testing.assert_allclose(
            prob, _probs([a], images[key], ("flip", "shift"))[cls], atol=2e-3
        )
    assert read_meta(label_files(tmp_path / "l")[0]).extra["tta"] == ["flip", "shift"]

    other = make_teacher(tmp_path / "o.pt", "cnn", num_classes=5)
    gray32 = make_teacher(tmp_path / "g.pt", "cnn", size=32)
    with_tta = tmp_path / "e.pt"
    assert (
        run_cli(["ensemble", "--members", str(a), "--tta", "flip", "--out", str(with_tta)], capsys)[
            0
        ]
        == 0
    )
    cases = [
        (["ensemble", "--members", str(a), str(other), "--out", "x.pt"], "other classes"),
        (["ensemble", "--members", str(a), str(gray32), "--out", "x.pt"], "other preprocessing"),
        (["ensemble", "--members", str(a), "--tta", "rotate", "--out", "x.pt"], "choose from"),
        (["ensemble", "--members", str(tmp_path / "no.pt"), "--out", "x.pt"], "does not exist"),
        (["ensemble", "--members", str(with_tta), "--out", "x.pt"], "is an ensemble"),
        (
            [*_label(with_tta, shards, tmp_path / "l2"), "--tta", "flip", "--k", "3"],
            "its own test-time augmentation",
        ),
        (
            [*PRETRAIN, str(shards), "--init", str(with_tta), "--out", str(tmp_path / "y")],
            "is an ensemble",
        ),
    ]
    for argv, expected in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert err.startswith("ssl-kd: error:") and err.count("\n") == 1, err
        assert expected in err, err
    assert not Path("x.pt").exists() and not (tmp_path / "l2").exists()
