"""Ray job: label shards with a teacher (``ray job submit -- python jobs/label.py --config …``).

Connects to the cluster in ``RAY_ADDRESS`` when set, else starts Ray locally; takes the same
config keys and flags as ``ssl-kd label``.
"""

import sys

from ssl_kd.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
