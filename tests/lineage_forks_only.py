"""Run by ``test_lineage`` in a child Python that adopts no orphans (not a subreaper).

Such a process does not list its own children when it searches a session
(each is one it forked, see :mod:`ralph_reaper.lineage`). Here, among a crowd
of its own idle children born before and after each dispatch, every session
shape is searched and compared with a read of every process: while it runs,
after its leader is killed (its orphans go past this process to the test
process, a subreaper and an ancestor) and after the leader is reaped. The
search must also leave the crowd unread. With ``late``, this process then
becomes a subreaper for one more search and stops being one: it catches orphans
from then on, but those the leader left went past it before, so the search must
still look above it (and now lists its children, the crowd among them).
Every process of a shape is killed and waited for here; its pids are printed
(``pids ...``) so that the test process reaps the ones it adopted. Exits
non-zero with the first mismatch.

Usage: ``python lineage_forks_only.py BACKEND CROWD [late]``
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any, Callable

from procs import wait_until
from ralph_reaper.backends import get as get_backend
from ralph_reaper.backends import using
from ralph_reaper.containment import Members
from ralph_reaper.lineage import Lineage, Walk, adopts_orphans, full_scan_members
from ralph_reaper.pins import Pin
from shapes import SHAPES, WAIT_S, Lines, kill_all


def _fork_crowd(n: int) -> list[int]:
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            signal.pause()
            os._exit(0)
        pids.append(pid)
    return pids


def _end_crowd(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # our own children, not reaped yet: the pid is theirs
    for pid in pids:
        os.waitpid(pid, 0)


class Reads:
    """Which processes the active backend read."""

    def __init__(self, backend: Any) -> None:
        self.pids: set[int] = set()
        inner: Callable[..., Any] = backend.proc_stat

        def counted(pid: int) -> Any:
            self.pids.add(pid)
            return inner(pid)

        backend.proc_stat = counted


LATE = sys.argv[3:] == ["late"]


def _same(lineage: Lineage, sid: int, reads: Reads, crowd: set[int]) -> None:
    backend = get_backend()
    searched: set[int] = set()
    scanned: set[int] = {-1}
    for _ in range(50):  # read again while the tree still moves
        scanned = set(full_scan_members(backend, sid))
        reads.pids.clear()
        searched = set(lineage.members(backend, sid))
        walked = set(Walk([lineage]).session(backend, sid))
        read = reads.pids & crowd
        if searched == scanned == walked and scanned == set(full_scan_members(backend, sid)):
            if read:
                raise SystemExit(f"the search read {len(read)} of our other children")
            return
    raise SystemExit(f"session {sid}: search {sorted(searched)} != scan {sorted(scanned)}")


def main() -> None:
    name, crowd_n = sys.argv[1], int(sys.argv[2])
    with using(name):
        backend = get_backend()
        if adopts_orphans(backend):
            raise SystemExit("this process adopts orphans: nothing here would be tested")
        reads = Reads(backend)
        old = _fork_crowd(crowd_n)
        try:
            for shape in (s for s in SHAPES if not s.detached):
                _one(shape, reads, crowd_n, set(old))
        finally:
            _end_crowd(old)
    print("ok", flush=True)


def _one(shape: Any, reads: Reads, crowd_n: int, old: set[int]) -> None:
    backend = get_backend()
    read_fd, write_fd = os.pipe()
    leader = subprocess.Popen(
        shape.cmd,
        stdout=write_fd,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=shape.env,
    )
    os.close(write_fd)
    pin = Pin.open(backend, leader.pid)
    assert pin is not None
    members = Members(backend, pin, "session")
    new = _fork_crowd(crowd_n)  # born after the leader: still never read
    # Once a subreaper (late), always one that may have adopted: it lists its children.
    crowd = set() if LATE else old | set(new)
    announced: list[Pin] = []  # a member may leave the session: killed by its own pin
    try:
        lineage = Lineage.record(backend, leader.pid)
        assert lineage is not None
        lines = Lines(read_fd)
        for _ in range(shape.npids):
            line = lines.readline(WAIT_S)
            assert line is not None
            announced_pin = Pin.open(backend, int(line))
            if announced_pin is not None:
                announced.append(announced_pin)
        _same(lineage, leader.pid, reads, crowd)
        pin.signal(signal.SIGKILL)
        assert wait_until(lambda: pin.exited(), timeout=WAIT_S)
        _same(lineage, leader.pid, reads, crowd)
        pin.collect()
        pin.reap_if_child()
        leader.returncode = -9  # reaped through the pin
        _same(lineage, leader.pid, reads, crowd)
        if LATE:
            backend.set_child_subreaper(True)
            try:
                _same(lineage, leader.pid, reads, crowd)
            finally:
                backend.set_child_subreaper(False)
    finally:
        for p in announced:
            p.signal(signal.SIGKILL)
        seen = kill_all(members) | {p.pid for p in announced}
        for p in announced:
            wait_until(p.exited, timeout=WAIT_S)
            p.close()
        leader.returncode = leader.returncode or -9
        os.close(read_fd)
        _end_crowd(new)
        print("pids", *sorted(seen), flush=True)


if __name__ == "__main__":
    main()
