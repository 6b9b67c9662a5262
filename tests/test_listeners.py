"""A command that starts its own Ray (no ``RAY_ADDRESS``) listens on loopback only: Ray's
servers and agents, the labeling actors, and Ray Train's workers with their DDP rendezvous.

The commands run in a child process; this test lists the listening TCP sockets of the child's
process tree (``/proc/net/tcp{,6}`` matched to ``/proc/PID/fd``) while they run."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_teacher, write_unlabeled_shards

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc"),
]

# One process, one Ray: labeling on actors, then one Ray Train worker (gloo process group).
CHILD = """
import json, sys
from ssl_kd.cli import main
sys.exit(next((code for code in map(main, json.loads(sys.argv[1])) if code), 0))
"""


def _tree(root: int) -> set[int]:
    """``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if stat:
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(children.get(pid, []))
    return tree


def _listening() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket on the machine."""
    found = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        for fields in (line.split() for line in lines):
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found[fields[9]] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return found


def _listeners(root: int) -> set[tuple[int, str, str, int]]:
    """(pid, command line, address, port) of each listening socket of ``root``'s tree."""
    listening = _listening()
    found = set()
    for pid in _tree(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            # The program's name, not its path: a deep install path would push it past the cut.
            cmd = " ".join([os.path.basename(argv[0]), *argv[1:]])
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                found.add((pid, cmd.strip()[:80], *listening[target[8:-1]]))
    return found


def test_a_local_ray_listens_on_loopback_only(
    separable_shards: dict[str, Path], tmp_path: Path
) -> None:
    # Enough images that the label actor lives through several samples of the sockets below.
    write_unlabeled_shards(tmp_path / "u", n_shards=4, per_shard=256)
    label = ["-q", "label", "--executor", "ray", "--workers", "1", "--device", "cpu", "--k", "2"]
    label += ["--teacher", str(make_teacher(tmp_path / "teacher.pt"))]
    label += ["--shards", str(tmp_path / "u"), "--out", str(tmp_path / "labels")]
    train = ["-q", "train", "--executor", "ray", "--workers", "1", "--device", "cpu"]
    train += ["--data", str(separable_shards["train"]), "--num-classes", "4", "--no-progress"]
    train += ["--steps", "4", "--batch-size", "8", "--warmup-steps", "0", "--shuffle-buffer", "0"]
    train += ["--log-every", "2", "--ckpt-every", "4", "--out", str(tmp_path / "train")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "child.log"
    with log.open("w") as sink:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps([label, train])],
            env=env,
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ray's processes with it, to kill them all on a timeout
        )
    seen: set[tuple[int, str, str, int]] = set()
    deadline = time.monotonic() + 240
    try:
        while child.poll() is None and time.monotonic() < deadline:
            seen |= _listeners(child.pid)
            time.sleep(0.2)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == 0, log.read_text()[-3000:]
    assert (tmp_path / "train" / "summary.json").is_file()

    names = {cmd for _, cmd, _, _ in seen}
    for part in ("gcs_server", "raylet", "ray::LabelWorker", "ray::RayTrainWorker"):
        assert any(part in cmd for cmd in names), f"no listener of {part} seen: {sorted(names)}"
    # The train worker's own gRPC server and the process group's store, at least.
    train = {pid for pid, cmd, _, _ in seen if "ray::RayTrainWorker" in cmd}
    assert len({(a, n) for pid, _, a, n in seen if pid in train}) >= 2, seen
    exposed = sorted(row for row in seen if not _loopback(row[2]))
    assert not exposed, "\n".join(f"{pid} {cmd}: {a} port {n}" for pid, cmd, a, n in exposed)


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 too
