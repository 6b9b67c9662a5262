"""``ssl-kd inspect``: what is in a label directory or a selection, as tables, JSON and pictures.

``labels`` summarises, views one class or key, and compares two label sets; ``selection`` reads
``selection.parquet`` and ``report.json``; ``plots`` draws charts; ``contact`` draws a class's
images, read from the original shards through a per-shard member index (``tar_index``).
Everything streams record batches, so memory does not grow with the number of images.
"""
