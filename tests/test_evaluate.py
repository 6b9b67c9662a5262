"""Evaluation metrics: hand-checked ECE, per-class accuracy, fidelity, model size; the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import make_teacher
from helpers import run_cli as _run
from torch import nn

from ssl_kd.errors import UserError
from ssl_kd.evaluate import metrics as metrics_module
from ssl_kd.evaluate.cka import linear_cka
from ssl_kd.evaluate.metrics import (
    calibration,
    ece,
    eval_loader,
    fidelity,
    kl_divergence,
    per_class_accuracy,
    predict,
)
from ssl_kd.evaluate.reference_cache import ReferenceOutputs
from ssl_kd.evaluate.run import EvalConfig, format_summary, run_evaluate
from ssl_kd.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from ssl_kd.models.preprocess import Preprocess, normalize
from ssl_kd.models.stats import count_macs, cpu_speed, model_size
from ssl_kd.shards import expand_shards


def test_ece_matches_hand_computation() -> None:
    # Bins are (k/15, (k+1)/15]; 0.91 and 0.92 share bin 13, the others sit alone.
    conf = torch.tensor([0.95, 0.91, 0.92, 0.30, 0.62])
    correct = torch.tensor([True, True, False, False, True])
    by_bin = [
        abs(1 - 0.95) * 1,  # bin 14
        abs(0.5 - (0.91 + 0.92) / 2) * 2,  # bin 13: acc 1/2, conf 0.915
        abs(0 - 0.30) * 1,  # bin 4
        abs(1 - 0.62) * 1,  # bin 9
    ]
    assert ece(conf, correct) == pytest.approx(sum(by_bin) / 5, abs=1e-6)
    cal = calibration(conf, correct)
    assert cal["ece"] == pytest.approx(sum(by_bin) / 5, abs=1e-6)
    assert cal["confidence_mean"] == pytest.approx(conf.double().mean().item())
    assert [b["n"] for b in cal["bins"]] == [0] * 4 + [1] + [0] * 4 + [1, 0, 0, 0, 2, 1]
    assert cal["bins"][13]["acc"] == 0.5 and cal["bins"][0]["acc"] is None
    # Perfect confidence on right answers is perfectly calibrated.
    assert ece(torch.ones(3), torch.ones(3, dtype=torch.bool)) == 0.0
    assert math.isnan(ece(torch.zeros(0), torch.zeros(0, dtype=torch.bool)))


def test_per_class_accuracy_matches_a_direct_count() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0, 1])
    pred = torch.tensor([0, 1, 1, 1, 0, 0, 0, 1])
    rows = per_class_accuracy(pred, labels, ["a", "b", "c", "d"])
    assert [r["name"] for r in rows] == ["a", "b", "c", "d"]
    pairs = list(zip(labels.tolist(), pred.tolist(), strict=True))
    for r in rows:
        c = r["class"]
        n = sum(1 for y, _ in pairs if y == c)
        hits = sum(1 for y, p in pairs if y == c and p == c)
        assert r["n"] == n
        assert r["top1"] == (hits / n if n else None)
    assert [r["top1"] for r in rows] == [2 / 3, 3 / 4, 0.0, None]


def test_kl_and_agreement_match_hand_computation() -> None:
    teacher = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).log()  # second row: log 0 = -inf
    student = torch.tensor([[0.25, 0.75], [0.5, 0.5]]).log()
    kl = kl_divergence(teacher, student)
    assert kl[0].item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert kl[1].item() == pytest.approx(math.log(2.0))  # the zero-probability class adds 0
    assert kl_divergence(student, student).abs().max().item() < 1e-12
    f = fidelity(
        pred=torch.tensor([0, 1, 2, 1]),
        teacher_pred=torch.tensor([0, 1, 1, 1]),
        kl=torch.tensor([0.1, 0.2, 0.3, 0.4]),
        labels=torch.tensor([0, 2, 1, 1]),
    )
    assert f["cka"] is None  # no features given
    assert {k: v for k, v in f.items() if k != "cka"} == pytest.approx(
        {"agreement": 0.75, "kl": 0.25, "teacher_top1": 0.75}
    )


def test_macs_params_and_size_of_a_known_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # out 8x10x12
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),  # out 8x5x6
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    expected = (8 * 10 * 12) * 3 * 3 * 3 + (8 * 5 * 6) * (8 // 4) * 3 * 3 + 8 * 5
    assert count_macs(model, (3, 10, 12)) == expected
    size = model_size(model, (3, 10, 12))
    assert size["macs"] == expected
    assert size["params"] == sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size["size_mb"] == pytest.approx(nbytes / 1e6, abs=1e-3)
    assert model.training  # counting leaves the mode as it found it


def test_cpu_speed_reports_positive_numbers() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    speed = cpu_speed(model, (1, 4, 4), budget_s=0.01, batch=8)
    assert speed["threads"] == torch.get_num_threads()
    assert speed["latency_ms"] > 0 and speed["images_per_s"] > 0
    assert speed["latency_runs"] >= 5 and speed["throughput_batch"] == 8


def _with_normalisation(path: Path, mean: float, std: float) -> Path:
    """Rewrite a checkpoint's recorded preprocessing (same weights, other mean/std)."""
    ckpt = load_checkpoint(path)
    ckpt["meta"]["preprocess"] |= {"mean": mean, "std": std}
    save_checkpoint(path, ckpt)
    return path


def _direct_pass(ckpt: Path, data: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All logits, penultimate features and labels of a checkpoint on the data, without the
    evaluation code path."""
    model, meta = model_from_checkpoint(load_checkpoint(ckpt))
    model.eval()
    pp = Preprocess.from_dict(meta["preprocess"])
    loader = eval_loader(expand_shards(str(data)), pp, meta["num_classes"], 1000)
    images, labels = next(iter(loader))
    with torch.no_grad():
        x = normalize(images, pp)
        return model(x), model.features(x), labels


def test_fidelity_to_itself_and_to_another_teacher(
    separable_shards: dict[str, Path], tmp_path: Path
) -> None:
    student = make_teacher(tmp_path / "student.pt", seed=0)
    teacher = _with_normalisation(make_teacher(tmp_path / "teacher.pt", seed=1), 0.3, 0.2)
    data = separable_shards["test"]
    base = EvalConfig(checkpoint=str(student), data=str(data), device="cpu", latency=False)

    itself = run_evaluate(replace(base, teacher=str(student)))
    assert itself["fidelity"]["agreement"] == 1.0
    assert itself["fidelity"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert itself["fidelity"]["teacher_top1"] == itself["top1"]
    assert itself["fidelity"]["cka"] == pytest.approx(1.0, abs=1e-6)
    assert itself["cpu"] is None

    other = run_evaluate(replace(base, teacher=str(teacher)))
    s_logits, s_feats, labels = _direct_pass(student, data)
    t_logits, t_feats, _ = _direct_pass(teacher, data)
    assert len(labels) == other["n"] == 64
    kl = nn.functional.kl_div(
        s_logits.double().log_softmax(1),
        t_logits.double().log_softmax(1),
        reduction="batchmean",
        log_target=True,
    ).item()
    fid = other["fidelity"]
    assert fid["kl"] > 0 and fid["kl"] == pytest.approx(kl, rel=1e-4)
    s_pred, t_pred = s_logits.argmax(1), t_logits.argmax(1)
    assert fid["agreement"] == pytest.approx(s_pred.eq(t_pred).float().mean().item())
    assert fid["teacher_top1"] == pytest.approx(t_pred.eq(labels).float().mean().item())
    assert other["top1"] == pytest.approx(s_pred.eq(labels).float().mean().item())
    assert fid["teacher_arch"] == "cnn" and fid["teacher_params"] > 0
    assert 0.0 <= fid["cka"] <= 1.0 and fid["cka"] < 1.0 - 1e-6
    assert fid["cka"] == pytest.approx(linear_cka(s_feats, t_feats), abs=1e-6)

    per_class = other["per_class"]
    assert [r["n"] for r in per_class] == [16, 16, 16, 16]
    for r in per_class:
        mask = labels == r["class"]
        assert r["top1"] == pytest.approx(s_pred[mask].eq(r["class"]).float().mean().item())
    conf = s_logits.double().softmax(1).max(1).values
    assert other["calibration"]["ece"] == pytest.approx(ece(conf, s_pred.eq(labels)), abs=1e-6)
    assert other["model"]["params"] == sum(
        p.numel() for p in model_from_checkpoint(load_checkpoint(student))[0].parameters()
    )


def test_cli_with_teacher_prints_fidelity_and_writes_json(
    separable_shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    student = make_teacher(tmp_path / "student.pt", seed=0)
    teacher = make_teacher(tmp_path / "teacher.pt", seed=1)
    out_json = tmp_path / "eval.json"
    code, out, _ = _run(
        [
            "-q",
            "evaluate",
            "--checkpoint",
            str(student),
            "--data",
            str(separable_shards["test"]),
            "--teacher",
            str(teacher),
            "--out",
            str(out_json),
            "--device",
            "cpu",
            "--latency-budget-s",
            "0.01",
        ],
        capsys,
    )
    assert code == 0
    lines = out.splitlines()
    assert "top-1" in lines[0] and str(out_json) in lines[0]
    assert any(
        ln.startswith("teacher cnn") and "agreement" in ln and "CKA 0." in ln for ln in lines
    )
    assert any("ECE" in ln for ln in lines) and any("MACs" in ln for ln in lines)
    assert any(ln.startswith("CPU (") for ln in lines)
    assert sum(1 for ln in lines if ln.split()[:1] in (["0"], ["1"], ["2"], ["3"])) == 4
    r = json.loads(out_json.read_text())
    for key in (
        "n",
        "top1",
        "top5",
        "loss",
        "per_class",
        "calibration",
        "fidelity",
        "model",
        "cpu",
        "arch",
        "config",
    ):
        assert key in r, key
    assert {"agreement", "kl", "teacher_top1", "cka", "teacher", "teacher_macs"} <= set(
        r["fidelity"]
    )
    assert 0.0 <= r["fidelity"]["cka"] <= 1.0
    assert {"ece", "confidence_mean", "bins"} <= set(r["calibration"])
    assert {"params", "macs", "size_mb"} <= set(r["model"])
    assert r["cpu"]["latency_ms"] > 0 and r["cpu"]["images_per_s"] > 0
    assert r["config"]["teacher"] == str(teacher)


@pytest.mark.parametrize("kw", [{"size": 8}, {"channels": 3}])
def test_teacher_with_another_input_format_reads_its_own_images(
    kw: dict[str, int],
    separable_shards: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    student = make_teacher(tmp_path / "student.pt")
    teacher = make_teacher(tmp_path / "teacher.pt", seed=1, **kw)
    test = str(separable_shards["test"])
    argv = ["-q", "evaluate", "--checkpoint", str(student), "--data", test, "--latency", "0"]
    argv += ["--teacher", str(teacher), "--device", "cpu", "--out", str(tmp_path / "e.json")]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    fidelity = json.loads((tmp_path / "e.json").read_text())["fidelity"]

    # The same figures from two separate passes, each model on its own preprocessing.
    urls = expand_shards(test)
    preds = []
    for path in (student, teacher):
        model, meta = model_from_checkpoint(load_checkpoint(path))
        pp = Preprocess.from_dict(meta["preprocess"])
        loader = eval_loader(urls, pp, 4, 64)
        preds.append(predict(model, loader, torch.device("cpu"), pp))
    s, t = preds
    assert fidelity["agreement"] == pytest.approx(s.pred.eq(t.pred).double().mean().item())
    assert fidelity["teacher_top1"] == pytest.approx(t.pred.eq(t.labels).double().mean().item())


def test_torchscript_teacher_gives_no_cka(
    separable_shards: dict[str, Path], tmp_path: Path
) -> None:
    student = make_teacher(tmp_path / "student.pt")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 4),
    ).eval()
    archive = tmp_path / "teacher.torchscript.pt"
    torch.jit.save(torch.jit.script(net), str(archive))
    cfg = EvalConfig(
        checkpoint=str(student),
        data=str(separable_shards["test"]),
        teacher=str(archive),
        device="cpu",
        latency=False,
    )
    r = run_evaluate(cfg)
    fid = r["fidelity"]
    assert fid["cka"] is None and fid["teacher_arch"] == "torchscript"
    assert 0.0 <= fid["agreement"] <= 1.0 and math.isfinite(fid["kl"])
    assert "CKA n/a" in format_summary(cfg, r)


def test_bf16_evaluation_matches_fp32(separable_shards: dict[str, Path], tmp_path: Path) -> None:
    ckpt = make_teacher(tmp_path / "m.pt")
    test = str(separable_shards["test"])
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = EvalConfig(
            checkpoint=str(ckpt), data=test, latency=False, device="cpu", precision=precision
        )
        results[precision] = run_evaluate(cfg)
    assert results["bf16"]["precision"] == "bf16"
    assert results["bf16"]["n"] == results["fp32"]["n"] > 0
    assert abs(results["bf16"]["top1"] - results["fp32"]["top1"]) <= 0.05


def _metrics(r: dict) -> dict:
    """The figures of an evaluation, without its timings and paths."""
    keep = ("n", "top1", "top5", "loss", "per_class", "calibration", "fidelity")
    return {k: r[k] for k in keep}


def test_teacher_outputs_are_computed_once_per_teacher_and_data(
    separable_shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = make_teacher(tmp_path / "teacher.pt", seed=1)
    students = [make_teacher(tmp_path / f"s{i}.pt", seed=10 + i) for i in range(2)]
    data = tmp_path / "own_test"
    shutil.copytree(separable_shards["test"], data)
    cache = tmp_path / "cache"
    base = EvalConfig(checkpoint="", data=str(data), teacher=str(teacher), latency=False)

    def scored(student: Path, **kw: object) -> dict:
        return run_evaluate(replace(base, checkpoint=str(student), **kw))

    plain = [scored(s) for s in students]
    first = scored(students[0], teacher_cache=str(cache))
    (stored,) = cache.iterdir()
    assert _metrics(first) == _metrics(plain[0])

    # The next student against the same teacher on the same data: the teacher does not run.
    calls = []
    original = metrics_module._forward

    def counting(model: nn.Module, x: torch.Tensor, with_features: bool) -> tuple:
        calls.append(model)
        return original(model, x, with_features)

    monkeypatch.setattr(metrics_module, "_forward", counting)
    second = scored(students[1], teacher_cache=str(cache))
    assert _metrics(second) == _metrics(plain[1])
    assert len(calls) == 1  # one batch of 64 images, the student's alone
    assert list(cache.iterdir()) == [stored]

    # A rewritten shard is other data: the teacher runs again, into another file.
    shard = sorted(data.glob("*.tar"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    calls.clear()
    scored(students[1], teacher_cache=str(cache))
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2


def test_stored_teacher_outputs_that_do_not_match_the_data_are_refused() -> None:
    stored = ReferenceOutputs(
        torch.tensor([0, 1, 2]), torch.zeros(3, 4), None, source="cache/abc.pt"
    )
    feats, logits = stored.take(1, torch.tensor([1, 2]))
    assert feats is None and logits.shape == (2, 4)
    with pytest.raises(UserError, match=r"cache/abc\.pt do not match .* image 1 on: delete"):
        stored.take(1, torch.tensor([2, 2]))
    with pytest.raises(UserError, match="do not match"):
        stored.take(2, torch.tensor([2, 0]))  # past the stored images
