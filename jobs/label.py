"""Ray job: label shards with a teacher (``ray job submit -- python jobs/label.py --config …``).

Connects to the cluster in ``RAY_ADDRESS`` when set, else starts Ray locally; takes the same
config keys and flags as ``ssl-kd label``.
"""

import os
import sys

# Python puts this script's folder first on sys.path, and jobs/select.py would then shadow the
# standard library's select module (imported by subprocess, asyncio, Ray): drop that entry.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from ssl_kd.cli import main  # noqa: E402 - after the sys.path fix above

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
