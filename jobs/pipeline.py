"""Ray job: the whole pipeline (``ray job submit -- python jobs/pipeline.py --config …``).

Connects to the cluster in ``RAY_ADDRESS`` when set, else starts Ray locally; takes the same
config keys and flags as ``ssl-kd run``.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("run"))
