"""The oracle's shards: the pseudo-labeled shards with every sample's labels replaced by the true
label of its image.

A student trained on them with the same architecture, budget and noise as the real one, then
fine-tuned the same way, is the results table's ``oracle`` row: the same images, labeled
without error, so the gap between it and the fine-tuned student is what pseudo-label errors
cost. Only possible where the truth of the unlabeled images is known (a benchmark such as the
Fashion-MNIST demo); each sample's ``json`` names the image it came from (``source_shard``,
``source_key``), the truth file's rows are keyed the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from ssl_kd import atomic, storage
from ssl_kd.errors import UserError
from ssl_kd.shards import ReadStats, ShardWriter, expand_shards, iter_shard, soft_label

DATASET_JSON = "dataset.json"


def read_truth(path: str) -> dict[tuple[str, str], int]:
    """``(shard, key) → true label`` of a truth file (Parquet: shard, key, label)."""
    if not storage.is_file(path):
        raise UserError(f"truth file {path} does not exist")
    table = pq.read_table(path, columns=["shard", "key", "label"])
    shards = table["shard"].cast("string").to_pylist()
    keys = table["key"].to_pylist()
    return dict(zip(zip(shards, keys, strict=True), table["label"].to_pylist(), strict=True))


def oracle_shards(pseudo: str, truth: str, out: str) -> dict[str, Any]:
    """Write the shards of ``pseudo`` (as ``ssl-kd materialize`` wrote them) into ``out`` with
    the same images, in the same order and shard sizes, each labeled with its true class (a
    one-class soft label of probability 1), less those of no task class (an open-set pool's);
    returns the counts."""
    labels = read_truth(truth)
    urls = expand_shards(pseudo)
    info = json.loads(storage.read_text(storage.join(pseudo, DATASET_JSON)))
    counts = {"samples": 0, "relabeled": 0, "no_class": 0}
    written: list[str] = []
    for i, url in enumerate(urls):
        # One output shard per input shard, numbered as the materialised ones are.
        with ShardWriter(storage.join(out, "train-%06d.tar"), 1 << 62, start_index=i) as w:
            for sample in _relabeled(url, labels, counts):
                w.write(sample)
        written += w.written
    info["soft_label"] = {"k": 1, "temperature": 1.0}
    atomic.write_text(storage.join(out, DATASET_JSON), json.dumps(info, indent=2) + "\n")
    return {**counts, "shards": len(written)}


def _relabeled(
    url: str, labels: dict[tuple[str, str], int], counts: dict[str, int]
) -> Iterator[dict[str, Any]]:
    stats = ReadStats()
    for sample in iter_shard(url, stats):
        soft = json.loads(sample["json"])
        where = (soft["source_shard"], soft["source_key"])
        label = labels.get(where)
        if label is None:
            raise UserError(
                f"the truth file has no label for image {where[1]!r} of {where[0]}; is it the "
                "truth of the unlabeled shards these were selected from?"
            )
        if label < 0:  # an open-set pool's image of no task class: the oracle leaves it out
            counts["no_class"] += 1
            continue
        counts["samples"] += 1
        counts["relabeled"] += int(label != soft["class"])
        # The selection's weight stays: the oracle trains with the student's recipe.
        weight = soft.get("weight")
        members = soft_label.encode(
            label, [label], [1.0], soft["score"], soft["rank"], where[0], where[1], weight
        )
        yield {**{k: v for k, v in sample.items() if k != "__url__"}, **members}
    if stats.skipped or stats.truncated_shards:
        raise UserError(f"{url} could not be read in full ({dict(stats.reasons)})")
