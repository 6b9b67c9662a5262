"""Shared start of the Ray job entrypoints in this folder.

Python puts a script's folder first on ``sys.path``, and ``jobs/select.py`` would then shadow the
standard library's ``select`` module (imported by subprocess, asyncio, Ray): importing this
module drops that entry before anything else is imported.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def run(stage: str) -> int:
    """Run ``ssl-kd <stage>`` with this process's arguments; returns the exit status."""
    from ssl_kd.cli import main

    return main([stage, *sys.argv[1:]])
