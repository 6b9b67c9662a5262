"""``ssl-kd estimate``: the projection's arithmetic, its inputs, and its errors."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from ssl_kd.errors import UserError
from ssl_kd.pipeline.estimate import EstimateConfig, estimate


def test_projection_from_a_measured_rate():
    cfg = EstimateConfig(
        images=1e9,
        model="cnn",
        image_size=28,
        channels=1,
        num_classes=10,
        gpus=4,
        images_per_s=2500.0,
        per_class=1000,
        top_p=2,
    )
    e = estimate(cfg)
    assert e["labeling"]["wall_hours"] == pytest.approx(1e9 / (2500 * 4) / 3600, abs=0.01)
    assert e["labeling"]["gpu_hours"] == pytest.approx(4 * e["labeling"]["wall_hours"], abs=0.1)
    assert e["selected_images"] == 1000 * 10  # K x classes, fewer than images x P
    # Label rows are tens of bytes at k=10 (the demo measured ~30 B on real labels).
    assert 10 < e["bytes_per_row"]["label"] < 80
    assert e["storage_bytes"]["labels"] == pytest.approx(
        1e9 * e["bytes_per_row"]["label"], rel=0.01
    )
    assert e["storage_bytes"]["materialised_shards"] > 10_000 * cfg.image_bytes


def test_projection_from_a_bench_report_scales_by_macs(tmp_path):
    bench = {
        "arch": "cnn",
        "image_size": 28,
        "pipeline": {
            "a": {"images_per_s": 800.0, "bytes_per_image": 28.0},
            "b": {"images_per_s": 900.0, "bytes_per_image": 28.0},
        },
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    same = estimate(
        EstimateConfig(
            images=1e6,
            model="cnn",
            image_size=28,
            channels=1,
            num_classes=10,
            from_bench=str(path),
            device="cpu",
        )
    )
    assert same["labeling"]["images_per_s_per_worker"] == pytest.approx(900.0, rel=0.02)
    assert "cpu_hours" in same["labeling"]
    bigger = estimate(
        EstimateConfig(
            images=1e6,
            model="cnn_deep",
            image_size=28,
            channels=1,
            num_classes=10,
            from_bench=str(path),
        )
    )
    assert bigger["labeling"]["images_per_s_per_worker"] < 900.0


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(UserError, match=r"not a bench/label_throughput\.py report"):
        estimate(EstimateConfig(images=1e6, from_bench=str(bad)))
    with pytest.raises(UserError, match="--top-p 5 exceeds --k 3"):
        estimate(EstimateConfig(images=1e6, k=3, top_p=5, images_per_s=1.0))
    code, _, err = run_cli(["estimate", "--images", "-1"], capsys)
    assert code == 2 and "images" in err


def test_cli_prints_the_projection(capsys):
    argv = [
        "estimate",
        "--images",
        "1e9",
        "--model",
        "cnn",
        "--image-size",
        "28",
        "--channels",
        "1",
        "--num-classes",
        "10",
        "--gpus",
        "8",
        "--images-per-s",
        "1000",
        "--json",
    ]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["inputs"]["source"] == "--images-per-s"
    assert doc["labeling"]["wall_hours"] == pytest.approx(1e9 / 8000 / 3600, abs=0.01)
