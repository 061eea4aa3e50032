"""Process-tree shapes shared by the tests that stop real trees, and helpers to watch them.

Each :class:`Shape` is a command whose tree prints its pids on stdout, one per
line, and then runs until it is stopped (or, for ``leader_exits``, whose
leader exits by itself and leaves the rest running). ``test_keeper_exec``
runs them under the keeper executable directly; ``test_tree_shapes`` runs
them through the public API on every backend. Nothing here asserts timing:
deadlines only turn a hang into a failure.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from procs import starttime, state, wait_until

if TYPE_CHECKING:
    from ralph_reaper.containment import Members

PY = sys.executable
SH = "/bin/sh"
SLEEP = shutil.which("sleep") or "/bin/sleep"
WAIT_S = 20.0  # hang guard only


class Lines:
    """Line reader over a pipe fd with a deadline per line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out reading from the pipe")
        ready, _, _ = select.select([self.fd], [], [], left)
        if ready:
            chunk = os.read(self.fd, 65536)
            if chunk:
                self.buf += chunk
            else:
                self.eof = True

    def readline(self, timeout: float = WAIT_S) -> Optional[str]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                if not self.buf:
                    return None
                line, self.buf = self.buf, b""
                return line.decode()
            self._fill(deadline)
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def rest(self, timeout: float = WAIT_S) -> list[str]:
        """Every remaining line, up to EOF."""
        out: list[str] = []
        while True:
            line = self.readline(timeout)
            if line is None:
                return out
            out.append(line)


class Member:
    """A pid of the tree, with its start time so a reused pid is not mistaken for it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = starttime(pid)

    def present(self) -> bool:
        st = starttime(self.pid)
        return st is not None and (self.start is None or st == self.start)


def assert_gone(members: Sequence[Member]) -> None:
    left = {m.pid: state(m.pid) for m in members if m.present()}
    assert not left, f"processes of the tree still in /proc (pid: state): {left}"


def py(code: str) -> list[str]:
    return [PY, "-c", PRELUDE + code]


# Shared by the python trees: out() prints pids to stdout (the test's pipe),
# child() forks a member that runs fn and never returns into the caller.
PRELUDE = r"""
import os, signal, sys, time
def out(*pids):
    os.write(1, "".join("%d\n" % p for p in pids).encode())
def forever():
    while True:
        time.sleep(1000)
def child(fn=forever):
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid
def state(pid):
    with open("/proc/%d/stat" % pid, "rb") as f:
        data = f.read()
    return data[data.rfind(b")") + 2:].split()[0]
"""


class Shape:
    """A process tree: its command, how many pids it prints, how many we must kill.

    ``detached``: a member leaves both the tree and the leader's session (it
    calls ``setsid`` after its parent exited), so only a subreaper can catch it.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        npids: int,
        killed: int,
        *,
        exact: bool = True,
        env: Optional[dict[str, str]] = None,
        leader_exits: Optional[int] = None,
        detached: bool = False,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.npids = npids
        self.killed = killed
        self.exact = exact
        self.env = env
        self.leader_exits = leader_exits
        self.detached = detached

    def __repr__(self) -> str:
        return self.name


_DAEMON = """
mid = os.fork()
if mid == 0:
    os.setsid()
    if os.fork() == 0:
        out(os.getpid())
        {grandchild}
    os._exit(0)
os.waitpid(mid, 0)
out(os.getpid())
forever()
"""

SHAPES = [
    Shape("background", [SH, "-c", "sleep 1000 & echo $!; echo $$; wait"], 2, 1),
    Shape(
        "nohup",
        [SH, "-c", "nohup sleep 1000 >/dev/null 2>&1 & echo $!; echo $$; wait"],
        2,
        1,
    ),
    Shape(
        "own_process_group",
        py(
            "child(lambda: (os.setpgid(0, 0), out(os.getpid()), forever())); out(os.getpid())\n"
            "forever()"
        ),
        2,
        1,
    ),
    Shape(
        "setsid",
        py(
            "child(lambda: (os.setsid(), out(os.getpid()), forever())); out(os.getpid())\nforever()"
        ),
        2,
        1,
    ),
    Shape("double_fork_daemon", py(_DAEMON.format(grandchild="forever()")), 2, 1, detached=True),
    Shape(
        "daemon_environment_cleared",
        py(_DAEMON.format(grandchild=f"os.execve({SLEEP!r}, ['sleep', '1000'], {{}})")),
        2,
        1,
        env={},
        detached=True,
    ),
    Shape(
        "ignores_sigterm",
        py(
            "def member():\n"
            "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "    out(os.getpid())\n"
            "    forever()\n"
            "child(member); out(os.getpid()); forever()"
        ),
        2,
        1,
    ),
    Shape(
        "stopped_member",
        py(
            "c = child()\n"
            "os.kill(c, signal.SIGSTOP)\n"
            "os.waitpid(c, os.WUNTRACED)\n"
            "out(c, os.getpid()); forever()"
        ),
        2,
        1,
    ),
    Shape(
        "forks_when_signalled",
        py(
            "def on_term(signum, frame):\n"
            "    child(lambda: (out(os.getpid()), forever()))\n"
            "def member():\n"
            "    signal.signal(signal.SIGTERM, on_term)\n"
            "    out(os.getpid())\n"
            "    forever()\n"
            "child(member); out(os.getpid()); forever()"
        ),
        2,
        1,
        exact=False,
    ),
    Shape(
        "chain_50_deep",
        py(
            "out(os.getpid())\n"
            "for i in range(50):\n"
            "    pid = os.fork()\n"
            "    if pid:\n"
            "        try:\n"
            "            os.waitpid(pid, 0)\n"
            "        finally:\n"
            "            os._exit(0)\n"
            "    out(os.getpid())\n"
            "forever()"
        ),
        51,
        50,
    ),
    Shape(
        "fan_of_500",
        py("kids = [child() for i in range(500)]\nout(os.getpid(), *kids)\nforever()"),
        501,
        500,
    ),
    Shape(
        "parent_never_reaps",
        py(
            "def parent():\n"
            "    zs = [child(lambda: None) for i in range(5)]\n"
            "    for z in zs:\n"
            "        while state(z) != b'Z':\n"
            "            time.sleep(0.001)\n"
            "    out(os.getpid(), *zs)\n"
            "    forever()\n"
            "child(parent); out(os.getpid()); forever()"
        ),
        7,
        1,  # the zombies are dead already: not signalled, not counted
    ),
    Shape(
        "leader_exits_first",
        py("kids = [child() for i in range(3)]\nout(os.getpid(), *kids)\nos._exit(7)"),
        4,
        3,
        leader_exits=7,
    ),
]


def kill_all(members: Members) -> set[int]:
    """SIGKILL every member, again until none is left, and reap the ones that are ours;
    return the pids of every member pinned on the way."""
    seen: set[int] = set()
    for _ in range(20):
        members.discover()
        live = members.live()
        seen.update(members.pins)
        for p in live:
            p.signal(signal.SIGKILL)
        wait_until(lambda: not members.live(), timeout=WAIT_S)
        for p in members.pins.values():
            if p.exited():
                p.collect()
                p.reap_if_child()
        members.reap_zombie_children()
        if not live:
            break
    members.close()
    return seen
