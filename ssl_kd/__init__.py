"""ssl_kd: billion-scale semi-supervised image classification with teacher and student models.

The package is layered; a module imports only from its own layer and the layers below it, never
upward and never in a circle (``tests/test_layers.py`` holds the tree to this order):

1. infrastructure: ``errors``, ``config``, ``storage``, ``atomic``, ``dir_lock`` (one writer
   per output directory), ``device``, ``ray_internals`` (every private Ray name, behind a
   check of Ray's version), ``ray_cluster`` (connecting to Ray, what the cluster has),
   ``executor`` (in-process or Ray, one retry policy),
   ``ray_resources`` (what a Ray cluster must have before workers start there),
   ``figures``, ``cluster_config``, ``stages`` (the one stage table, as import strings);
2. data: ``shards/`` (spec expansion, tar read/write, decoding, soft-label members) and
   ``datasets/``;
3. ``models/`` (registry, timm models, weights files, external teachers, ensembles and
   test-time augmentation, preprocessing, the checkpoint format, size and speed);
4. the stages, in this order: ``label/``, ``select/``, ``materialize/``, ``evaluate/``,
   ``train/``, ``inspect/``. Each holds its config and runner (``run.py``), a pure core named for
   what it computes, and its on-disk contract (``files.py``). A stage may import an earlier
   stage's contracts and cores (training validates with ``evaluate.metrics``), never its runner;
5. the drivers: ``pipeline/`` (the resumable plan, the oracle's shards, precision against the
   truth, results, and ``estimate`` of a run at scale) and ``cli``.
"""

__version__ = "0.1.0"
