"""Linear CKA: against the HSIC form by hand, its invariances, and the results table's column."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ssl_kd.evaluate.cka import linear_cka
from ssl_kd.models.ensemble import Ensemble, has_features
from ssl_kd.models.registry import create_model
from ssl_kd.pipeline.results import collect, format_markdown


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from n x n Gram matrices and the centring matrix H = I - 11ᵀ/n."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, ell = x @ x.T, y @ y.T
    return np.trace(k @ h @ ell @ h) / math.sqrt(
        np.trace(k @ h @ k @ h) * np.trace(ell @ h @ ell @ h)
    )


def test_linear_cka_matches_the_hsic_form_by_hand() -> None:
    x = np.array([[1, 0, 2], [0, 1, 1], [3, 1, 0], [2, 2, 2], [0, 0, 1]], dtype=np.float64)
    y = np.array([[1, 1], [0, 2], [4, 0], [1, 3], [2, 0]], dtype=np.float64)
    expected = _hsic_cka(x, y)
    assert 0.05 < expected < 0.95  # a case that is neither trivial extreme
    got = linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert got == pytest.approx(expected, abs=1e-6)
    assert linear_cka(torch.tensor(y), torch.tensor(x)) == pytest.approx(expected, abs=1e-12)


def test_linear_cka_invariances_and_independence() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x.double() @ q) == pytest.approx(1.0, abs=1e-9)  # orthogonal transform
    assert linear_cka(x, 3 * x + 5) == pytest.approx(1.0, abs=1e-6)  # scale and shift
    a = torch.randn(5000, 8, generator=gen)
    b = torch.randn(5000, 6, generator=gen)
    assert 0.0 <= linear_cka(a, b) < 0.2


def test_linear_cka_undefined_cases() -> None:
    assert math.isnan(linear_cka(torch.ones(1, 3), torch.ones(1, 2)))  # n < 2
    assert math.isnan(linear_cka(torch.zeros(0, 0), torch.zeros(0, 0)))
    constant = torch.full((10, 3), 2.0)
    assert math.isnan(linear_cka(constant, torch.randn(10, 4)))  # no variance: denominator 0
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))


def test_has_features_of_classifiers_ensembles_and_plain_modules() -> None:
    cnn = create_model("cnn", 4, 1, 16, width=0.5)
    assert has_features(cnn) and has_features(Ensemble([cnn, cnn], tta=("flip",)))
    assert not has_features(nn.Sequential(nn.Flatten(), nn.Linear(256, 4)))  # logits only


def test_results_table_has_a_cka_column(tmp_path: Path) -> None:
    from ssl_kd.pipeline.builder import Model

    def metrics(cka: float | None) -> dict:
        fidelity = {"agreement": 0.9, "kl": 0.1} | ({} if cka is None else {"cka": cka})
        return {
            "top1": 0.8,
            "top5": 0.99,
            "calibration": {"ece": 0.02},
            "arch": "cnn",
            "model": {"params": 10, "macs": 20},
            "cpu": None,
            "fidelity": fidelity,
        }

    models = []
    # The finetuned seeds have CKA; the teacher has no teacher, the baseline's metrics no "cka".
    figures = [("t", "teacher", 0, None, None), ("b0", "baseline", 0, 0, None)]
    figures += [("f0", "finetuned", 1, 0, 0.6), ("f1", "finetuned", 1, 1, 0.8)]
    for slug, role, rnd, seed, cka in figures:
        (tmp_path / "eval" / slug).mkdir(parents=True)
        m = metrics(cka) if role != "teacher" else {**metrics(None), "fidelity": None}
        (tmp_path / "eval" / slug / "metrics.json").write_text(json.dumps(m))
        models.append(Model(slug, role, rnd, seed, slug, "", None, None))
    doc = collect(str(tmp_path), models)
    rows = {t["model"]: t for t in doc["models"]}
    assert rows["finetuned"]["cka"]["mean"] == pytest.approx(0.7)
    assert rows["finetuned"]["cka"]["std"] == pytest.approx(math.sqrt(0.02))
    assert [s["cka"] for s in rows["finetuned"]["per_seed"]] == [0.6, 0.8]
    assert rows["baseline"]["cka"]["mean"] is None and rows["teacher"]["cka"]["mean"] is None

    lines = format_markdown(doc, "T").splitlines()
    header = next(ln for ln in lines if ln.startswith("| model |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    col = cells.index("CKA")
    assert cells[col - 1] == "KL"
    assert len(lines[lines.index(header) + 1].strip("|").split("|")) == len(cells)
    by_model = {}
    for ln in lines:
        row = [c.strip() for c in ln.strip("|").split("|")]
        if len(row) == len(cells) and row[0] in rows:
            by_model[row[0]] = row
    assert by_model["finetuned"][col] == "0.700"
    assert by_model["baseline"][col] == "–" and by_model["teacher"][col] == "–"
    assert by_model["baseline"][col - 1] == "0.100"  # KL still in its place
