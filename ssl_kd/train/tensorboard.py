"""Rank 0's record of a training run: ``metrics.jsonl`` and TensorBoard event files, line for line.

Every record the loop logs goes to both (:class:`RunLog`). In TensorBoard
(``out/tensorboard/events.out.tfevents.*``) each number of a record is a scalar at the record's
``step``: ``train/<key>`` for the step lines (the loss and its parts, ``lr``, ``images_per_s``,
``epoch``), ``val/<key>`` for the evaluations (``val_top1`` becomes ``val/top1``).

A resumed run writes a new event file whose purge step is the first step it trains, so
TensorBoard drops whatever the interrupted run logged past its checkpoint, as
:meth:`~ssl_kd.train.loop.MetricsLog.keep_until` drops those JSON lines: each curve goes on as
one, every step once. Events reach the file at checkpoints, at the end, and every
``_FLUSH_SECS`` from the writer's own thread, never on the training step. An object-store ``out``
gets its event file from a local temp directory, uploaded at every checkpoint and at the end.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ssl_kd import storage
from ssl_kd.train.loop import MetricsLog

TENSORBOARD_DIR = "tensorboard"
_FLUSH_SECS = 120  # a live run's curves lag by at most this much
_STAMP = re.compile(r"tfevents\.(\d+)\.")


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of one metrics record (its numbers but ``step``)."""
    tags = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tag = f"val/{key.removeprefix('val_')}" if key.startswith("val_") else f"train/{key}"
        tags[tag] = float(value)
    return tags


class TensorBoardLog:
    """The event files of one run in ``out/tensorboard``; the file opens with the first record."""

    def __init__(self, out: str) -> None:
        self.url = storage.join(out, TENSORBOARD_DIR)
        self.remote = storage.is_remote(out)
        self.purge_step = 1  # a fresh start: an earlier attempt's curves go entirely
        self._writer: Any = None
        self._local = ""

    def keep_until(self, step: int) -> None:
        """Have TensorBoard drop what was logged past ``step``: the resumed run logs it again."""
        self.purge_step = step + 1

    def write(self, record: dict[str, Any]) -> None:
        """Add the record's numbers as scalars at its step."""
        writer = self._open()
        for tag, value in scalar_tags(record).items():
            writer.add_scalar(tag, value, int(record["step"]))

    def flush(self) -> None:
        """Put every event so far in the file (and, for an object store, upload it)."""
        if self._writer is not None:
            self._writer.flush()
            self._upload()

    def close(self) -> None:
        """Flush, stop the writer's thread and remove a temp directory."""
        if self._writer is None:
            return
        try:
            self._writer.close()
            self._upload()
        finally:  # the temp directory goes even when the store refused the upload
            if self.remote:
                shutil.rmtree(self._local, ignore_errors=True)
            self._writer = None

    def _open(self) -> Any:
        if self._writer is None:
            # Imported here: loading tensorboard takes seconds, and only rank 0 needs it.
            from torch.utils.tensorboard import SummaryWriter

            _wait_past(self.url)
            if self.remote:
                self._local = tempfile.mkdtemp(prefix="ssl_kd-tensorboard-")
            else:
                self._local = storage.local_path(self.url)
            self._writer = SummaryWriter(
                self._local, purge_step=self.purge_step, flush_secs=_FLUSH_SECS
            )
        return self._writer

    def _upload(self) -> None:
        if self.remote:
            for path in sorted(Path(self._local).iterdir()):
                storage.upload(path, storage.join(self.url, path.name))


def _wait_past(url: str) -> None:
    """Wait until the clock has left the second the newest event file in ``url`` was opened in.

    TensorBoard reads a run's event files in name order, and a name starts with that second:
    a resumed run's file must sort last, or its purge step would apply before the old events
    and the out-of-order old steps would then purge the new ones. Waits at most a second (a
    file stamped later than that came from a skewed clock, and waiting would not help).
    """
    stamps = [int(m.group(1)) for f in storage.list_dir(url) if (m := _STAMP.search(f))]
    wait = max(stamps, default=0) + 1 - time.time()
    if wait > 0:
        time.sleep(min(wait, 1.0))


class RunLog:
    """``metrics.jsonl`` and the TensorBoard event files of a run, written by rank 0."""

    def __init__(self, out: str) -> None:
        self.jsonl = MetricsLog(storage.join(out, "metrics.jsonl"))
        self.tensorboard = TensorBoardLog(out)

    def keep_until(self, step: int) -> None:
        """Drop what was logged past ``step``: a resumed run logs those steps again, once."""
        self.jsonl.keep_until(step)
        self.tensorboard.keep_until(step)

    def write(self, record: dict[str, Any]) -> None:
        """Log one record (``step`` and numbers) to both."""
        self.jsonl.write(record)
        self.tensorboard.write(record)

    def flush(self) -> None:
        """Make both as complete on storage as the checkpoint about to be written."""
        self.tensorboard.flush()  # a JSON line is on storage once written

    def close(self) -> None:
        """Flush and release the TensorBoard writer."""
        self.tensorboard.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
