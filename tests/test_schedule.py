"""Learning-rate schedules as arrays."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_kd.train.schedule import lr_schedule


def test_cosine_warms_up_then_decays_to_floor() -> None:
    lr = lr_schedule("cosine", 0.1, 100, warmup_steps=10)
    assert len(lr) == 100
    assert lr[0] == pytest.approx(0.01) and lr[9] == pytest.approx(0.1)
    assert np.all(np.diff(lr[10:]) <= 1e-12) and lr[-1] == pytest.approx(0.0)


def test_onecycle_peaks_at_30_percent() -> None:
    lr = lr_schedule("onecycle", 1.0, 100)
    assert int(np.argmax(lr)) in (29, 30)
    assert lr[0] == pytest.approx(1 / 25) and lr[-1] == pytest.approx(1 / 25 / 1e4)


def test_constant_and_unknown() -> None:
    assert np.allclose(lr_schedule("constant", 0.2, 5), 0.2)
    with pytest.raises(ValueError, match="cosine"):
        lr_schedule("step", 0.1, 5)
