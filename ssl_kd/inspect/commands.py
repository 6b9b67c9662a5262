"""``ssl-kd inspect labels|selection``: one call per command, returning one JSON-able document.

The document is the requested view (summary, class, key, compare or selection) plus the paths
of any charts (``plots``) and contact sheet (``contact_sheet``) written on the way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ssl_kd import storage
from ssl_kd.config import option
from ssl_kd.errors import UserError
from ssl_kd.inspect import text
from ssl_kd.inspect.compare import compare_labels
from ssl_kd.inspect.labels import (
    class_top,
    find_key,
    open_labels,
    resolve_class,
    summarize_labels,
)
from ssl_kd.inspect.plots import label_plots, selection_plots
from ssl_kd.inspect.selection import open_selection, selection_top, summarize_selection

_TOP = "images per class view or contact sheet"
_SHARDS = "where the shards are (none: as recorded at labeling)"


@dataclass(frozen=True)
class InspectLabelsConfig:
    """``ssl-kd inspect labels``: one view (summary unless cls, key or compare) plus pictures."""

    directory: str = option(
        help="directory of label files (ssl-kd label)", positional=True, metavar="DIR"
    )
    cls: str | None = option(
        None, help="class name or index", flag="--class", metavar="C", exclusive="view"
    )
    key: str | None = option(
        None, help="show this image's labels in every shard that has it", exclusive="view"
    )
    compare: str | None = option(
        None, help="top-1 agreement with these labels", metavar="OTHER_DIR", exclusive="view"
    )
    top: int = option(16, help=_TOP, min=1, metavar="N")
    plots: str | None = option(None, help="write PNG charts into DIR", metavar="DIR")
    contact_sheet: str | None = option(None, help="draw the class's top images", metavar="CLASS")
    out: str | None = option(None, help="where --contact-sheet writes", metavar="FILE.png")
    shards: str | None = option(None, help=_SHARDS, metavar="DIR_OR_SPEC")


@dataclass(frozen=True)
class InspectSelectionConfig:
    """``ssl-kd inspect selection``: per-class table plus pictures."""

    directory: str = option(
        help="directory written by ssl-kd select", positional=True, metavar="DIR"
    )
    top: int = option(16, help=_TOP, min=1, metavar="N")
    plots: str | None = option(None, help="write PNG charts into DIR", metavar="DIR")
    contact_sheet: str | None = option(None, help="draw the class's top images", metavar="CLASS")
    out: str | None = option(None, help="where --contact-sheet writes", metavar="FILE.png")
    shards: str | None = option(None, help=_SHARDS, metavar="DIR_OR_SPEC")


def _check_pictures(cfg: InspectLabelsConfig | InspectSelectionConfig) -> None:
    if (cfg.contact_sheet is None) != (cfg.out is None):
        raise UserError("--contact-sheet CLASS and --out FILE.png go together")
    if cfg.plots is not None and storage.is_file(cfg.plots):
        raise UserError(f"--plots {cfg.plots} is a file; give a directory for the charts")


def inspect_labels(cfg: InspectLabelsConfig) -> dict[str, Any]:
    """The requested view of a label directory; writes charts and a contact sheet if asked."""
    _check_pictures(cfg)
    if sum(v is not None for v in (cfg.cls, cfg.key, cfg.compare)) > 1:
        raise UserError("give at most one of --class, --key and --compare")
    labels = open_labels(cfg.directory)
    meta = labels.meta
    if cfg.cls is not None:
        doc = class_top(labels, resolve_class(meta, cfg.cls), cfg.top)
    elif cfg.key is not None:
        doc = find_key(labels, cfg.key)
    elif cfg.compare is not None:
        doc = compare_labels(labels, open_labels(cfg.compare))
    else:
        doc = summarize_labels(labels)
    if cfg.plots is not None:
        summary = doc if doc["view"] == "summary" else summarize_labels(labels)
        doc["plots"] = [str(p) for p in label_plots(summary, cfg.plots)]
    if cfg.contact_sheet is not None:
        from ssl_kd.inspect.contact import contact_sheet  # imports torch
        from ssl_kd.label.files import shard_locations

        cls = resolve_class(meta, cfg.contact_sheet)
        same = doc["view"] == "class" and doc["class"] == cls
        view = doc if same else class_top(labels, cls, cfg.top)
        locations = shard_locations(cfg.directory, cfg.shards)
        path = contact_sheet(view, locations, str(cfg.out), "top-1 probability")
        doc["contact_sheet"] = str(path)
    return doc


def inspect_selection(cfg: InspectSelectionConfig) -> dict[str, Any]:
    """The per-class table of a selection; writes charts and a contact sheet if asked."""
    _check_pictures(cfg)
    doc = summarize_selection(cfg.directory)
    if cfg.plots is not None:
        doc["plots"] = [str(p) for p in selection_plots(doc, cfg.plots)]
    if cfg.contact_sheet is not None:
        from ssl_kd.inspect.contact import contact_sheet  # imports torch
        from ssl_kd.select.files import shard_locations

        _, meta = open_selection(cfg.directory)
        view = selection_top(cfg.directory, resolve_class(meta, cfg.contact_sheet), cfg.top)
        locations = shard_locations(cfg.directory, cfg.shards)
        path = contact_sheet(view, locations, str(cfg.out), "selection rank")
        doc["contact_sheet"] = str(path)
    return doc


_FORMATS = {
    "summary": text.format_summary,
    "class": text.format_class,
    "key": text.format_key,
    "compare": text.format_compare,
    "selection": text.format_selection,
}


def format_document(cfg: Any, doc: dict[str, Any]) -> str:
    """The human-readable table of a document, then the files it wrote."""
    lines = [_FORMATS[doc["view"]](doc)]
    if doc.get("plots"):
        lines.append(f"plots: {', '.join(doc['plots'])}")
    if doc.get("contact_sheet"):
        lines.append(f"contact sheet: {doc['contact_sheet']}")
    return "\n".join(lines)
