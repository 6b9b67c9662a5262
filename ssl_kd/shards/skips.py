"""Skipped samples: the error a bad sample raises, and the record of what a read skipped.

A bad sample is never a crash and never the shard's failure: it raises :class:`SampleError`
with a stable ``reason`` code (the counting key of every summary) and a plain-text detail, and
the read records it in :class:`ReadStats` and goes on.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_RECORDED_ERRORS = 1000  # keep memory bounded on a billion-image read with many bad samples
MAX_LOGGED = 20  # distinct skips logged one by one per read; the rest are counted only

# The reason codes: the keys of every summary's counts (the README lists them too).
REASONS = (
    "no image member",
    "corrupt image",
    "image too large",
    "unusable image",
    "duplicate member",
    "duplicate key",
    "unsafe key",
    "no label",
    "bad label",
    "label out of range",
    "bad soft label",
    "truncated tar",
    "unreadable shard",
)

_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def plain(exc: BaseException) -> str:
    """An exception's message as plain text: first line, no object reprs, bounded length."""
    text = _REPR.sub("", str(exc)).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class SampleError(ValueError):
    """A sample that cannot be used: ``reason`` is one of :data:`REASONS`, ``detail`` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ReadStats:
    """What a read saw: good samples, skipped ones by reason code, truncated shards.

    Each distinct skip is logged once (up to :data:`MAX_LOGGED`), however many epochs read it
    again; counts keep growing with every read.
    """

    samples: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, str]] = field(default_factory=list)
    truncated_shards: set[str] = field(default_factory=set)
    _logged: set[tuple[str, str, str]] = field(default_factory=set, repr=False)

    def record(self, shard: str, key: str | None, reason: str, detail: str = "") -> None:
        """Count one skipped sample (or unreadable part of a shard)."""
        assert reason in REASONS, f"unknown skip reason {reason!r}: add it to REASONS"
        self.skipped += 1
        self.reasons[reason] += 1
        seen = (shard, key or "", reason)
        if seen in self._logged:
            return
        if len(self.errors) < MAX_RECORDED_ERRORS:
            self.errors.append(
                {"shard": shard, "key": key or "", "reason": reason, "detail": detail}
            )
        if len(self._logged) < MAX_LOGGED:
            self._logged.add(seen)
            text = f"{reason}: {detail}" if detail else reason
            log.warning("skipped sample %s in %s: %s", key or "?", shard, text)
            if len(self._logged) == MAX_LOGGED:
                log.warning("further skipped samples are counted in the summary, not logged")

    def skip(self, shard: str, key: str | None, exc: SampleError) -> None:
        """Record ``exc`` for one sample."""
        self.record(shard, key, exc.reason, exc.detail)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "samples": self.samples,
            "skipped": self.skipped,
            "reasons": dict(self.reasons),
            "truncated_shards": sorted(self.truncated_shards),
        }
