"""Ray job: selection → shuffled shards (``ray job submit -- python jobs/materialize.py …``).

Connects to the cluster in ``RAY_ADDRESS`` when set, else starts Ray locally; takes the same
config keys and flags as ``ssl-kd materialize``.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("materialize"))
