"""Exported programs (``torch.export.save``) as teachers: what PyTorch now recommends over
TorchScript for shipping a model without its Python code.

A ``.pt2`` archive is recognised by its content (:func:`is_exported_program`), loaded with
``torch.export.load`` and run through ``.module()``. Like a TorchScript archive it maps a float
image batch to logits and gives no embeddings; it is code as well as weights, so load only
archives you trust (``torch.export.load`` unpickles).

The program's input shape is read from the archive: a static height and width set the teacher's
image size; a static batch (a program exported from one example batch without
``dynamic_shapes``) is run on chunks of that size, the last one padded with copies of its last
image whose outputs are dropped, so any labeling batch works (exporting with a dynamic batch
saves the padding). A program exported in training mode (batch norm on batch statistics,
dropout on) is refused: its labels would depend on the batch.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass

import torch
from torch import nn

from ssl_kd import storage
from ssl_kd.errors import UserError

# torch >= 2.6 writes a PT2 archive: a top folder holding ``archive_format`` ("pt2") and the
# programs under ``models/``; torch 2.3-2.5 wrote ``serialized_exported_program.json``.
_PT2_FORMAT = "archive_format"
_OLD_LAYOUT = "serialized_exported_program.json"


def is_exported_program(archive: zipfile.ZipFile) -> bool:
    """Whether a zip archive is what ``torch.export.save`` writes."""
    names = archive.namelist()
    if any(n == _OLD_LAYOUT or n.endswith("/" + _OLD_LAYOUT) for n in names):
        return True
    formats = [n for n in names if n.count("/") == 1 and n.endswith("/" + _PT2_FORMAT)]
    return any(archive.read(n).strip() == b"pt2" for n in formats)


@dataclass(frozen=True)
class InputShape:
    """The program's image input: each size where it is static (None: dynamic), and the
    batch sizes its dynamic batch accepts."""

    batch: int | None
    channels: int | None
    height: int | None
    width: int | None
    min_batch: int = 1
    max_batch: int | None = None


class ExportedTeacher(nn.Module):
    """An exported classifier run on batches of any size, optionally restricted to some of its
    classes."""

    def __init__(self, program: nn.Module, shape: InputShape, keep: list[int] | None = None):
        super().__init__()
        self.program = program
        self.min_batch = shape.batch or shape.min_batch
        self.max_batch = shape.batch or shape.max_batch
        self.keep = keep

    def train(self, mode: bool = True) -> ExportedTeacher:
        # torch.export's modules refuse train()/eval(): the mode is fixed when exporting (and
        # checked to be eval when loading), so only this wrapper's flag changes.
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self.max_batch or len(x)
        outs = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            n = len(chunk)
            if n < self.min_batch:  # padded with copies of its last image, dropped below
                pad = chunk[-1:].expand(self.min_batch - n, *chunk.shape[1:])
                chunk = torch.cat([chunk, pad])
            outs.append(self.program(chunk)[:n])
        logits = outs[0] if len(outs) == 1 else torch.cat(outs)
        return logits if self.keep is None else logits[:, self.keep]


def load_program(path: str) -> tuple[nn.Module, InputShape]:
    """The program's module and its input shape; UserError when it cannot label images."""
    shown = storage.display(path)
    try:
        source = storage.loadable(path)
        program = torch.export.load(source)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"exported program {shown} does not load with this torch ({first[:200]}); save it "
            "with torch.export.save from this version of torch or an older one"
        ) from None
    shape = _input_shape(program, shown)
    training = _training_ops(program.graph)
    if training:
        raise UserError(
            f"exported program {shown} was exported in training mode ({', '.join(training)}): "
            "call model.eval() before torch.export.export"
        )
    return program.module(), shape


def _input_shape(program: torch.export.ExportedProgram, shown: str) -> InputShape:
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        raise UserError(
            f"exported program {shown} takes {len(inputs)} inputs; export a module that takes "
            "one (batch, channels, height, width) image batch"
        )
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0])
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        raise UserError(
            f"exported program {shown} does not take a (batch, channels, height, width) image "
            "batch; export it with one"
        )
    sizes = [d if isinstance(d, int) else None for d in value.shape]
    low, high = 1, None
    if sizes[0] is None:
        bounds = program.range_constraints.get(value.shape[0].node.expr)
        if bounds is not None:
            low, high = max(1, _as_int(bounds.lower) or 1), _as_int(bounds.upper)
    return InputShape(*sizes, min_batch=low, max_batch=high)


def _as_int(value: object) -> int | None:
    """A finite bound as an int; None for an unbounded one (torch's ``int_oo``)."""
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def _training_ops(graph: torch.fx.Graph) -> list[str]:
    """The training-mode batch norms and dropouts of ``graph`` (their ``training``/``train``
    argument is a constant True: args[5] of every batch-norm op, args[2] of dropout)."""
    found = []
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "call_function":
            continue
        if "batch_norm" in name and len(node.args) > 5 and node.args[5] is True:
            found.append("batch norm")
        elif "dropout" in name and len(node.args) > 2 and node.args[2] is True:
            found.append("dropout")
    return sorted(set(found))
