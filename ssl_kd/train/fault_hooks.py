"""Fault injection for the restart and node-loss tests, switched on by environment variables.

Both take ``PATH:STEP``. The training loop calls them after every step; unset, they return at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# "PATH:STEP" fails once at STEP, leaving PATH behind (the restart tests).
FAIL_ONCE_ENV = "SSL_KD_FAIL_ONCE"
# "PATH:STEP" holds every rank after step STEP (and its checkpoint) until PATH exists, so that a
# node is lost at a known step however fast or slow training is (the node-loss tests).
HOLD_ENV = "SSL_KD_HOLD_AT"


def maybe_fail(step: int) -> None:
    """Raise once at the step ``FAIL_ONCE_ENV`` names."""
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    path, at = spec.rsplit(":", 1)
    if step == int(at) and not os.path.exists(path):
        Path(path).write_text(f"failed once at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_ONCE_ENV})")


def maybe_hold(step: int, limit_s: float = 600) -> None:
    """Wait at the step ``HOLD_ENV`` names until its file exists (at most ``limit_s``)."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    path, at = spec.rsplit(":", 1)
    deadline = time.monotonic() + limit_s
    while step == int(at) and not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.2)
