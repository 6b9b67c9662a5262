"""The class files an external teacher is named with: its class names (``--class-names``) and
the classes to keep (``--keep-classes``), and the head restricted to those."""

from __future__ import annotations

import torch
from torch import nn

from ssl_kd import storage
from ssl_kd.errors import UserError


def class_names(path: str | None, n: int | None) -> list[str]:
    """The names in ``path`` (one per line, exactly ``n`` unless None), or ``0``..``n-1``."""
    if path is None:
        assert n is not None
        return [str(i) for i in range(n)]
    if not storage.is_file(path):
        raise UserError(f"class-names file {storage.display(path)} does not exist")
    names = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
    if n is None and not names:
        raise UserError(f"class-names file {storage.display(path)} lists no class")
    if n is not None and len(names) != n:
        raise UserError(
            f"class-names file {storage.display(path)} has {len(names)} names but the teacher "
            f"predicts {n} classes; give one name per line, in the teacher's class order"
        )
    return names


def keep_rows(model: nn.Module, keep: list[int]) -> None:
    """Replace the classifier's head by the rows of the ``keep`` classes."""
    head = nn.Linear(model.head.in_features, len(keep))
    with torch.no_grad():
        head.weight.copy_(model.head.weight[keep])
        head.bias.copy_(model.head.bias[keep])
    model.head = head


def kept_indices(path: str, classes: list[str]) -> list[int]:
    """The indices of the classes listed in ``path`` (names or indices), in its order."""
    if not storage.is_file(path):
        raise UserError(f"keep-classes file {storage.display(path)} does not exist")
    wanted = [line.strip() for line in storage.read_text(path).splitlines() if line.strip()]
    if not wanted:
        raise UserError(f"keep-classes file {storage.display(path)} lists no class")
    index = {name: i for i, name in enumerate(classes)}
    keep = []
    for item in wanted:
        if item in index:
            keep.append(index[item])
        elif item.isdigit() and int(item) < len(classes):
            keep.append(int(item))
        else:
            raise UserError(
                f"keep-classes file {storage.display(path)}: {item!r} is neither a class name "
                f"of the teacher nor an index below {len(classes)}"
            )
    if len(set(keep)) != len(keep):
        raise UserError(f"keep-classes file {storage.display(path)} lists a class twice")
    return keep
