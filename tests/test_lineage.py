"""The search of a session where its processes can be finds exactly what a read of every
process finds, on every tree shape, with thousands of unrelated processes beside it.

The unrelated processes are the test process's own children (a crowd in a
session of its own), started before the dispatch and after it: the one kind is
skipped by its start time, the other is walked and rejected, and, when the
crowd is named as another dispatch of ours, left out unwalked. The test process
is a child subreaper (conftest.py), so what a shape orphans comes back to it,
an ancestor of the leader, where the search must look.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from procs import child_env, session, wait_until
from procs import parent as parent_of
from ralph_reaper import lineage as lineage_mod
from ralph_reaper.backends import get as get_backend
from ralph_reaper.containment import Members, sessions_in_use
from ralph_reaper.lineage import Lineage, Walk, adopts_orphans, full_scan_members, sharing
from ralph_reaper.pins import Pin
from shapes import SHAPES, WAIT_S, Lines, Shape, kill_all

pytestmark = pytest.mark.timeout(300)

#: Unrelated processes born before every dispatch of the module (skipped by start time).
OLD_CROWD = 2000
#: Unrelated processes born after each dispatch (walked, and rejected or left out).
NEW_CROWD = 300

_CROWD = r"""
import os, signal, sys
n = int(sys.argv[1])
for _ in range(n):
    if os.fork() == 0:
        signal.pause()
        os._exit(0)
print("ready", flush=True)
signal.pause()
"""


class Crowd:
    """A process with ``n`` idle children, in a session of its own."""

    def __init__(self, n: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CROWD, str(n)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n"

    def close(self) -> None:
        # Its group holds it and its children alone (nothing in it calls setsid).
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        # Its children were reparented to us (a subreaper) before it became a zombie.
        while True:
            try:
                os.waitpid(-self.proc.pid, 0)
            except ChildProcessError:
                break


@pytest.fixture(scope="module")
def old_crowd() -> Iterator[Crowd]:
    """Set up before each test's leftover check, so it is not counted as a leftover."""
    crowd = Crowd(OLD_CROWD)
    try:
        yield crowd
    finally:
        crowd.close()


@pytest.fixture
def crowds(old_crowd: Crowd) -> Iterator[list[Crowd]]:
    made: list[Crowd] = []
    try:
        yield made
    finally:
        for crowd in made:
            crowd.close()


def _same(lineage: Lineage, sid: int, **kwargs: object) -> None:
    """The search and the full read agree (read again while the tree still moves)."""
    backend = get_backend()
    searched: set[int] = set()
    scanned: set[int] = {-1}
    for _ in range(50):
        scanned = set(full_scan_members(backend, sid))
        searched = set(lineage.members(backend, sid, **kwargs))  # type: ignore[arg-type]
        if searched == scanned and scanned == set(full_scan_members(backend, sid)):
            return
    assert searched == scanned, f"search {sorted(searched)} != scan {sorted(scanned)}"


SESSION_SHAPES = [s for s in SHAPES if not s.detached]


def _start(shape: Shape) -> tuple[subprocess.Popen[bytes], Pin, int]:
    """The shape's leader in a session of its own, pinned; and the read end of the
    pipe its processes announce themselves on."""
    read_fd, write_fd = os.pipe()
    leader = subprocess.Popen(
        shape.cmd,
        stdout=write_fd,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=shape.env,
    )
    os.close(write_fd)
    pin = Pin.open(get_backend(), leader.pid)
    assert pin is not None
    return leader, pin, read_fd


def _piped(cmd: list[str]) -> tuple[subprocess.Popen[bytes], Pin]:
    """``cmd`` as a leader in a session of its own, its stdout a pipe to us, pinned."""
    leader = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)
    assert leader.stdout is not None
    pin = Pin.open(get_backend(), leader.pid)
    assert pin is not None
    return leader, pin


def _kill_leader(leader: subprocess.Popen[bytes], pin: Pin) -> None:
    """SIGKILL the leader, reap it through its pin: its children are orphaned, to us."""
    pin.signal(signal.SIGKILL)
    assert wait_until(lambda: pin.exited(), timeout=WAIT_S)
    pin.collect()
    pin.reap_if_child()
    leader.returncode = -9  # reaped through the pin


@pytest.mark.parametrize("shape", SESSION_SHAPES, ids=repr)
def test_the_search_finds_what_the_scan_finds(
    backend: str, shape: Shape, crowds: list[Crowd]
) -> None:
    leader, pin, read_fd = _start(shape)
    members = Members(get_backend(), pin, "session")
    try:
        lineage = Lineage.record(get_backend(), leader.pid)
        assert lineage is not None and lineage.ancestors[0][0] == os.getpid()
        crowds.append(Crowd(NEW_CROWD))  # born after it, child of an ancestor: walked
        lines = Lines(read_fd)
        for _ in range(shape.npids):
            assert lines.readline(WAIT_S) is not None
        sid = leader.pid
        _same(lineage, sid)
        crowd = crowds[-1].proc.pid
        _same(lineage, sid, others=lambda pid, _start: pid == crowd)
        members.discover()
        assert set(members.pins) >= set(full_scan_members(get_backend(), sid))
        # The leader dies: its children are orphaned, to this process (a subreaper).
        pin.signal(signal.SIGKILL)
        assert wait_until(lambda: pin.exited(), timeout=WAIT_S)
        _same(lineage, sid)
        pin.collect()
        pin.reap_if_child()
        leader.returncode = -9  # reaped through the pin
        _same(lineage, sid)
        busy = sessions_in_use(get_backend(), {sid: lineage})
        assert busy == ({sid} if full_scan_members(get_backend(), sid) else set())
    finally:
        kill_all(members)
        leader.returncode = leader.returncode or -9  # reaped through its pin
        os.close(read_fd)


def test_a_caller_catching_orphans_since_before_the_leader_reads_nothing_above_itself(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process is a subreaper (conftest.py) from before the leader's birth: the
    leader's orphans come to it, none can be further up, so neither its parent nor
    anything above is read, and the search still finds what the scan finds."""
    adopts_orphans(get_backend())  # a look: seen catching orphans from this tick on
    tick = _boot_tick()
    assert wait_until(lambda: _boot_tick() > tick, timeout=WAIT_S)  # born at a later tick
    leader, pin = _piped(["sh", "-c", "sleep 30 & sleep 30 & echo $!; exec sleep 30"])
    assert leader.stdout is not None
    members = Members(get_backend(), pin, "session")
    try:
        lineage = Lineage.record(get_backend(), leader.pid)
        assert lineage is not None and lineage.ancestors[0][0] == os.getpid()
        above = {pid for pid, _start in lineage.ancestors[1:]}
        assert above  # the test process has a parent: something that could be read
        int(leader.stdout.readline())  # both background children started
        read: set[int] = set()
        backend_obj = get_backend()
        real_stat, real_children = backend_obj.proc_stat, lineage_mod.children_of
        monkeypatch.setattr(backend_obj, "proc_stat", lambda pid: read.add(pid) or real_stat(pid))
        monkeypatch.setattr(
            lineage_mod, "children_of", lambda pid, *a: read.add(pid) or real_children(pid, *a)
        )
        _kill_leader(leader, pin)
        _same(lineage, leader.pid)
        assert len(full_scan_members(backend_obj, leader.pid)) == 2
        assert not read & above, f"read above this process: {sorted(read & above)}"
    finally:
        monkeypatch.undo()
        kill_all(members)
        leader.returncode = leader.returncode or -9
        leader.stdout.close()


def _boot_tick() -> int:
    """Now, in the unit of /proc start times."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK") // 10**9


def test_a_member_that_exits_as_the_search_passes_does_not_hide_its_child(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member exits after the search listed it among this process's children and
    before it read the member's own: its child went to this process (a subreaper), in
    a list already read. The exit is made to fall exactly there: the member is killed
    (our own child, by its pid) from inside the search's read of its stat."""
    leader, pin = _piped(["sh", "-c", 'sh -c "sleep 30 & echo \\$!; wait" & echo $!; wait'])
    assert leader.stdout is not None
    pids = [int(leader.stdout.readline()) for _ in range(2)]  # in either order
    member = next(p for p in pids if parent_of(p) == leader.pid)
    grandchild = next(p for p in pids if p != member)
    lineage = Lineage.record(get_backend(), leader.pid)
    assert lineage is not None
    sid = leader.pid
    _kill_leader(leader, pin)
    assert wait_until(lambda: parent_of(member) == os.getpid(), timeout=WAIT_S)
    members = Members(get_backend(), None, "session", session=sid, lineage=lineage)
    backend_obj = get_backend()
    real_stat = backend_obj.proc_stat
    killed: list[int] = []

    def stat(pid: int) -> object:
        if pid == member and not killed:
            killed.append(pid)
            os.kill(member, signal.SIGKILL)  # our unreaped child: the pid is its own
            assert wait_until(lambda: parent_of(grandchild) == os.getpid(), timeout=WAIT_S)
        return real_stat(pid)

    try:
        monkeypatch.setattr(backend_obj, "proc_stat", stat)
        live = members.discover_live()
        monkeypatch.undo()
        assert killed == [member]
        assert [p.pid for p in live] == [grandchild]
    finally:
        monkeypatch.undo()
        kill_all(members)
        pin.close()
        leader.stdout.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(member, 0)


def test_a_search_without_lineage_falls_back_to_the_scan(backend: str) -> None:
    """A session whose leader is gone and whose ancestry was never recorded: read whole."""
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 30 & echo $!"], stdout=subprocess.PIPE, start_new_session=True
    )
    assert leader.stdout is not None
    child = int(leader.stdout.readline())
    leader.wait()
    leader.stdout.close()
    members = Members(get_backend(), None, "session", session=leader.pid)
    try:
        assert members.lineage is None
        assert members.discover() == 1 and set(members.pins) == {child}
    finally:
        kill_all(members)


def test_one_walk_for_several_sessions_finds_what_the_scan_finds(
    backend: str, crowds: list[Crowd]
) -> None:
    """Searches made together share one walk of the union of their regions
    (timeouts that fall at once): each session gets exactly its own processes, from a
    walk read at once or in steps (a monitor's, between which it takes in exits)."""
    shapes = SESSION_SHAPES[:6]
    started: list[tuple[subprocess.Popen[bytes], Members, int]] = []
    try:
        for shape in shapes:
            leader, pin, read_fd = _start(shape)
            started.append((leader, Members(get_backend(), pin, "session"), read_fd))
            lines = Lines(read_fd)
            for _ in range(shape.npids):
                assert lines.readline(WAIT_S) is not None
        crowds.append(Crowd(NEW_CROWD))  # born after them all, beside them
        lineages = [m.lineage for _, m, _ in started]
        assert all(lineage is not None for lineage in lineages)
        for _ in range(50):  # read again while a tree still moves
            walk = Walk([lineage for lineage in lineages if lineage is not None])
            stepped = Walk([lineage for lineage in lineages if lineage is not None])
            scans = [set(full_scan_members(get_backend(), p.pid)) for p, _, _ in started]
            walked = [set(walk.session(get_backend(), p.pid)) for p, _, _ in started]
            steps = 1
            while not stepped.advance(get_backend(), until=0.0):  # one process a step
                steps += 1
            in_steps = [set(stepped.session(get_backend(), p.pid)) for p, _, _ in started]
            rescans = [set(full_scan_members(get_backend(), p.pid)) for p, _, _ in started]
            if scans == walked == in_steps == rescans:
                break
        assert walked == scans
        assert in_steps == scans and steps > len(shapes)  # read over many steps
        sids = {p.pid: m.lineage for p, m, _ in started}
        expected = {p.pid for p, _, _ in started if full_scan_members(get_backend(), p.pid)}
        assert sessions_in_use(get_backend(), sids) == expected
    finally:
        for leader, members, read_fd in started:
            kill_all(members)
            leader.returncode = leader.returncode or -9  # reaped through its pin
            os.close(read_fd)


def test_a_shared_walk_that_saw_a_member_alive_is_not_believed_empty(backend: str) -> None:
    """The walk saw the leader alive; the leader then forks and exits. Through the
    walk its child is unseen, so "nothing is left" must come from a fresh search."""
    leader = subprocess.Popen(
        ["sh", "-c", "read go; sleep 30 & echo $!"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert leader.stdin is not None and leader.stdout is not None
    pin = Pin.open(get_backend(), leader.pid)
    assert pin is not None
    members = Members(get_backend(), pin, "session")
    try:
        assert members.lineage is not None
        with sharing(Walk([members.lineage])):
            members.discover()  # the walk is taken: the leader alone, alive
            leader.stdin.write(b"go\n")
            leader.stdin.close()
            child = int(leader.stdout.readline())
            assert wait_until(lambda: pin.exited(), timeout=WAIT_S)
            live = members.discover_live()
        assert [p.pid for p in live] == [child]
    finally:
        kill_all(members)
        leader.returncode = leader.returncode or -9  # reaped through its pin
        leader.stdout.close()


def test_a_process_that_adopts_no_orphans_never_reads_its_other_children(backend: str) -> None:
    """A loop that is no subreaper (the usual case) starts every dispatch from one
    process: its other children, hundreds, are not even listed, and the search
    still finds what the scan finds, orphans included (see lineage_forks_only.py)."""
    _forks_only(backend)


def test_a_subreaper_since_after_the_leader_was_born_still_looks_above_itself(
    backend: str,
) -> None:
    """A caller that has caught orphans since before a leader was born leaves the
    ancestors above it unread (none of the session's orphans can be there); one that
    became a subreaper later must not: the leader's orphans went past it before."""
    _forks_only(backend, "late")


def _forks_only(backend: str, *mode: str) -> None:
    script = os.path.join(os.path.dirname(__file__), "lineage_forks_only.py")
    child = subprocess.run(
        [sys.executable, script, backend, str(NEW_CROWD), *mode],
        capture_output=True,
        env=child_env(),
        timeout=240,
    )
    # What the script's shapes orphaned came to us (a subreaper); it killed them all.
    me = os.getpid()
    for line in child.stdout.decode().splitlines():
        if line.startswith("pids"):
            for pid in map(int, line.split()[1:]):
                if parent_of(pid) == me:
                    os.waitpid(pid, 0)
    assert child.returncode == 0, child.stderr.decode()[-3000:]
    assert child.stdout.decode().splitlines()[-1] == "ok"


#: A child subreaper with two threads; its second thread starts the leader's parent
#: (``_PARENT``), then says which thread it is; its main thread then exits or waits.
_ADOPTER = r"""
import ctypes, os, subprocess, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
main_exits = sys.argv[1] == "1"
started = threading.Event()
def second():
    parent = subprocess.Popen([sys.executable, "-c", sys.argv[2], *sys.argv[3:]])
    print("parent", parent.pid, file=sys.stderr, flush=True)
    print("thread", threading.get_native_id(), file=sys.stderr, flush=True)
    started.set()
    while True:
        time.sleep(60)
threading.Thread(target=second, daemon=True).start()
started.wait()
if main_exits:
    libc.pthread_exit(None)  # ctypes lets go of the GIL: the second thread runs on
while True:
    time.sleep(60)
"""

#: The leader's parent, no subreaper: it starts the leader in a session of its own.
_PARENT = r"""
import signal, subprocess, sys
leader = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, start_new_session=True)
print("leader", leader.pid, file=sys.stderr, flush=True)
leader.wait()
signal.pause()
"""


def _task_children(pid: int, tid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
            return {int(x) for x in f.read().split()}
    except OSError:
        return set()


@pytest.mark.parametrize("main_exits", [False, True], ids=["main_thread", "main_thread_exited"])
@pytest.mark.parametrize(
    "shape", [s for s in SESSION_SHAPES if s.name in ("background", "chain_50_deep")], ids=repr
)
def test_orphans_adopted_further_up_are_found_on_the_thread_that_took_them(
    backend: str, shape: Shape, main_exits: bool
) -> None:
    """Orphans go to a subreaper above the leader's parent: to its main thread, or,
    once that has exited, to another thread. The search reads the main thread's
    children alone unless that is exiting, and still finds what the scan finds."""
    read_fd, write_fd = os.pipe()  # the shape's pids
    names_r, names_w = os.pipe()  # the adopter's and the parent's "name pid" lines
    adopter = subprocess.Popen(
        [sys.executable, "-c", _ADOPTER, "1" if main_exits else "0", _PARENT, *shape.cmd],
        stdout=write_fd,
        stderr=names_w,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=shape.env,
    )
    os.close(write_fd)
    os.close(names_w)
    members: Members | None = None
    parent = leader = -1
    pids: list[int] = []
    try:
        names = Lines(names_r)
        named: dict[str, int] = {}
        while len(named) < 3:
            line = names.readline(WAIT_S)
            assert line is not None, "the adopter's tree ended early"
            word, _, rest = line.strip().partition(" ")
            if word in ("parent", "thread", "leader"):
                named[word] = int(rest)
        parent, thread, leader = named["parent"], named["thread"], named["leader"]
        lines = Lines(read_fd)
        for _ in range(shape.npids):
            line = lines.readline(WAIT_S)
            assert line is not None, "the shape's tree ended early"
            pids.append(int(line))
        pin = Pin.open(get_backend(), leader)
        assert pin is not None
        members = Members(get_backend(), pin, "session")
        lineage = Lineage.record(get_backend(), leader)
        assert lineage is not None
        assert [a[0] for a in lineage.ancestors[:3]] == [parent, adopter.pid, os.getpid()]
        _same(lineage, leader)
        pin.signal(signal.SIGKILL)  # its children are orphaned, to the adopter
        orphans = {p for p in pids if p != leader and parent_of(p) in (leader, adopter.pid)}
        assert orphans, "the shape orphans nothing"
        assert wait_until(lambda: all(parent_of(p) == adopter.pid for p in orphans), WAIT_S)
        holder = thread if main_exits else adopter.pid
        assert orphans <= _task_children(adopter.pid, holder), "not where the kernel puts them"
        _same(lineage, leader)
    finally:
        if members is not None:
            kill_all(members)
        adopter.kill()
        adopter.wait()
        # What the adopter held (its zombies too) is ours since it died: we are a subreaper.
        _kill_ours([parent, *pids], {adopter.pid, leader})
        os.close(read_fd)
        os.close(names_r)


def _kill_ours(pids: list[int], sessions: set[int]) -> None:
    """SIGKILL and reap those of ``pids`` (all started by this test) that are our
    children in one of ``sessions``, until none is (a pid cannot be handed out again
    before we reap it)."""
    me = os.getpid()
    for _ in range(len(pids) + 1):
        ours = [p for p in pids if p > 0 and parent_of(p) == me and session(p) in sessions]
        if not ours:
            return
        for pid in ours:
            os.kill(pid, signal.SIGKILL)
        for pid in ours:
            os.waitpid(pid, 0)
