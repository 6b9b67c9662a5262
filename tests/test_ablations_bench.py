"""bench/ablations.py's reuse of a finished run: stage outputs and their markers are copied."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ssl_kd.pipeline.stages import marker_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ablations


def test_reuse_copies_stage_outputs_and_markers(tmp_path: Path) -> None:
    src, out = tmp_path / "demo", tmp_path / "ablations"
    for name in ("data", "round1/labels"):
        (src / name).mkdir(parents=True)
        (src / name / "part.txt").write_text(name)
        marker = Path(marker_path(str(src), name))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"fingerprint": name}))
    ablations.reuse(src, out)
    for name in ("data", "round1/labels"):
        assert (out / name / "part.txt").read_text() == name
        marker = json.loads(Path(marker_path(str(out), name)).read_text())
        assert marker == {"fingerprint": name}
    assert not (out / "teacher").exists()  # what the finished run lacks is not invented
