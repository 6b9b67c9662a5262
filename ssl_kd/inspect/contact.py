"""Contact sheets: a class's best images in a grid, with their scores, read from the shards.

Label and selection files name each image's shard by file name (``u-000012.tar``), not by
path; the shards are found through the shard spec recorded in the label directory's
``config.yaml`` (for a selection: that of the label directory it was made from), or through the
spec the user gives. Each shard is opened once and only the wanted members are read.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ssl_kd.errors import UserError
from ssl_kd.figures import new_figure, save_png
from ssl_kd.shards.reader import SampleError, decode_image
from ssl_kd.shards.tar_index import read_images
from ssl_kd.shards.tario import is_gopen_url

log = logging.getLogger(__name__)


def _readable(url: str) -> str:
    if url.startswith("file://"):
        return url[len("file://") :]
    if is_gopen_url(url):
        raise UserError(
            f"contact sheets read shards on disk or in an object store, and {url} is neither: "
            "copy the shards here and pass --shards DIR"
        )
    return url


def fetch_images(rows: list[dict[str, Any]], locations: dict[str, str]) -> list[np.ndarray | None]:
    """The decoded (H, W[, 3]) uint8 image of each row (``shard``, ``key``); None if corrupt."""
    wanted: dict[str, set[str]] = {}
    for row in rows:
        wanted.setdefault(row["shard"], set()).add(row["key"])
    data: dict[tuple[str, str], bytes] = {}
    for shard, keys in wanted.items():
        if shard not in locations:
            raise UserError(
                f"shard {shard} is not among the {len(locations)} shards found: "
                "pass --shards DIR_OR_SPEC naming it"
            )
        for key, blob in read_images(_readable(locations[shard]), keys).items():
            data[shard, key] = blob
    images: list[np.ndarray | None] = []
    for row in rows:
        try:
            img = decode_image(data[row["shard"], row["key"]], None).numpy()
        except SampleError as exc:
            log.warning("cannot draw %s of %s: %s", row["key"], row["shard"], exc)
            images.append(None)
            continue
        images.append(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
    return images


def draw_contact_sheet(
    rows: list[dict[str, Any]], images: list[np.ndarray | None], title: str, out: str | Path
) -> Path:
    """A grid of ``images`` captioned with each row's score and key, saved as PNG."""
    n = len(rows)
    cols = max(1, math.ceil(math.sqrt(n)))
    lines = max(1, math.ceil(n / cols))
    fig = new_figure(1.7 * cols, 1.9 * lines + 0.4)
    fig.suptitle(title, fontsize=10)
    for i, (row, img) in enumerate(zip(rows, images, strict=True)):
        ax = fig.add_subplot(lines, cols, i + 1)
        if img is None:
            ax.text(0.5, 0.5, "undecodable", ha="center", va="center", fontsize=7)
        else:
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        key = row["key"] if len(row["key"]) <= 18 else "…" + row["key"][-17:]
        ax.set_title(f"{row['score']:.3f}\n{key}", fontsize=7)
        ax.set_axis_off()
    return save_png(fig, out)


def contact_sheet(
    view: dict[str, Any], locations: dict[str, str], out: str | Path, source: str
) -> Path:
    """Draw the ``top`` rows of a class view (labels or selection) to ``out``."""
    rows = view["top"]
    if not rows:
        raise UserError(f"no images of class {view['name']!r} in {view['directory']}")
    title = f"{view['name']} (class {view['class']}): top {len(rows)} by {source}"
    return draw_contact_sheet(rows, fetch_images(rows, locations), title, out)
