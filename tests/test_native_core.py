"""NativeBackend (the C core through cffi) against real processes.

Every process a test starts is tracked by the ``tracked`` fixture through a
pidfd opened while it was certainly alive, and is killed and reaped (or seen
reaped by its own parent) before the test ends. The fixture makes this
process a child subreaper for the duration, so orphaned grandchildren come
back here to be reaped instead of piling up under PID 1. No test asserts on
timing: waits have generous deadlines only to turn a hang into a failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

try:
    from ralph_reaper import _native  # noqa: F401
except ImportError:
    pytest.skip("native backend not built", allow_module_level=True)

from ralph_reaper.backends.base import ProcStat
from ralph_reaper.backends.native import NativeBackend

SH = "/bin/sh"
#: An fd number nothing in the test process has open.
BAD_FD = 1_000_000


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = os.uname().release.split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (IndexError, ValueError):
        return False


HAS_EXIT_INFO = _kernel_at_least(6, 15)  # PIDFD_GET_INFO with PIDFD_INFO_EXIT


def _wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``predicate()`` until true; fail (not hang) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


class Procs:
    """Spawns processes and guarantees they are gone at the end of the test."""

    def __init__(self, backend: NativeBackend) -> None:
        self.backend = backend
        self.fds: dict[int, int] = {}  # pid -> pidfd

    def spawn(self, argv: Sequence[str], *, setsid: bool = False) -> tuple[int, int]:
        """Start ``argv`` (no shell lookup: argv[0] is a path); return (pid, pidfd)."""
        pid = os.posix_spawn(argv[0], list(argv), dict(os.environ), setsid=setsid)
        # Our unreaped child: its pid cannot be reused before we open the pidfd.
        fd = self.backend.pidfd_open(pid)
        self.fds[pid] = fd
        return pid, fd

    def python(self, code: str) -> tuple[int, int]:
        return self.spawn([sys.executable, "-c", code])

    def adopt(self, pid: int) -> int:
        """Track a descendant; call only while it is known to be alive."""
        if pid not in self.fds:
            self.fds[pid] = self.backend.pidfd_open(pid)
        return self.fds[pid]

    def cleanup(self) -> None:
        b = self.backend
        for fd in self.fds.values():
            with contextlib.suppress(ProcessLookupError):
                b.pidfd_send_signal(fd, signal.SIGKILL)
        pending = dict(self.fds)
        deadline = time.monotonic() + 30.0
        while pending:
            for pid, fd in list(pending.items()):
                # Reap it if it is ours (or was orphaned to us); ECHILD: it was
                # reaped already, or its live parent will.
                with contextlib.suppress(ChildProcessError):
                    b.waitid_pidfd(fd, nohang=True)
                try:
                    b.pidfd_send_signal(fd, 0)  # succeeds until the process is reaped
                except ProcessLookupError:
                    del pending[pid]
                    os.close(fd)
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"processes not reaped: {sorted(pending)}")
            if pending:
                time.sleep(0.01)
        self.fds.clear()


@pytest.fixture
def native() -> NativeBackend:
    return NativeBackend()


@pytest.fixture
def tracked(native: NativeBackend) -> Iterator[Procs]:
    was_subreaper = native.get_child_subreaper()
    native.set_child_subreaper(True)
    tracker = Procs(native)
    try:
        yield tracker
    finally:
        try:
            tracker.cleanup()
        finally:
            native.set_child_subreaper(was_subreaper)


def _core_pattern_is_pipe() -> bool:
    try:
        with open("/proc/sys/kernel/core_pattern") as f:
            return f.read().startswith("|")
    except OSError:
        return True


_SEGV = (
    "import os, resource, signal\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "signal.signal(signal.SIGSEGV, signal.SIG_DFL)\n"
    "os.kill(os.getpid(), signal.SIGSEGV)\n"
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("raise SystemExit(0)", 0),
        ("raise SystemExit(3)", 3 << 8),
        ("raise SystemExit(255)", 255 << 8),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", signal.SIGKILL),
        (_SEGV, signal.SIGSEGV),
    ],
    ids=["exit0", "exit3", "exit255", "sigkill", "sigsegv"],
)
def test_waitid_status_decoding(
    native: NativeBackend, tracked: Procs, code: str, expected: int
) -> None:
    pid, fd = tracked.python(code)
    assert native.wait_readable([fd], None) == [fd]
    # The zombie's /proc exit_code is the kernel's own wait status: the same
    # encoding waitid must produce (it would include 0x80 had a core been dumped).
    zombie = native.proc_stat(pid)
    assert zombie is not None and zombie.state == "Z"
    reaped = native.waitid_pidfd(fd, nohang=False)
    assert reaped is not None
    assert reaped.status == zombie.exit_code
    if expected == signal.SIGSEGV and _core_pattern_is_pipe():
        # RLIMIT_CORE does not stop core dumps to a pipe: allow the dump bit.
        assert reaped.status & 0x7F == signal.SIGSEGV
    else:
        assert reaped.status == expected
    assert reaped.rusage is not None
    assert reaped.rusage.maxrss_kb > 0
    assert reaped.rusage.utime_s >= 0.0 and reaped.rusage.stime_s >= 0.0
    with pytest.raises(ChildProcessError):
        native.waitid_pidfd(fd)


@pytest.mark.timeout(60)
def test_nohang_then_kill(native: NativeBackend, tracked: Procs) -> None:
    _, fd = tracked.spawn([SH, "-c", "exec sleep 30"])
    assert native.waitid_pidfd(fd, nohang=True) is None
    assert native.wait_readable([fd], 0) == []
    assert native.wait_readable([fd], 0.01) == []
    assert native.pidfd_exit_status(fd) is None
    native.pidfd_send_signal(fd, signal.SIGKILL)
    assert native.wait_readable([fd], None) == [fd]
    reaped = native.waitid_pidfd(fd, nohang=False)
    assert reaped is not None and reaped.status == signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        native.pidfd_send_signal(fd, 0)


@pytest.mark.timeout(60)
def test_waitid_on_non_child_raises_child_process_error(
    native: NativeBackend, tracked: Procs
) -> None:
    parent_fd = native.pidfd_open(os.getppid())  # alive, and not our child
    try:
        with pytest.raises(ChildProcessError) as info:
            native.waitid_pidfd(parent_fd, nohang=True)
        assert info.value.errno == errno.ECHILD
    finally:
        os.close(parent_fd)
    # A child someone else (here: os.waitpid) already reaped is no child either.
    pid, fd = tracked.spawn([SH, "-c", "exit 5"])
    assert os.waitpid(pid, 0) == (pid, 5 << 8)
    with pytest.raises(ChildProcessError):
        native.waitid_pidfd(fd, nohang=False)


@pytest.mark.timeout(60)
def test_pidfd_exit_status_after_waitpid(native: NativeBackend, tracked: Procs) -> None:
    if not HAS_EXIT_INFO:
        pytest.skip("PIDFD_INFO_EXIT needs Linux >= 6.15")
    pid, fd = tracked.spawn([SH, "-c", "exit 42"])
    _, status = os.waitpid(pid, 0)
    assert status == 42 << 8
    assert native.pidfd_exit_status(fd) == status
    pid, fd = tracked.python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    _, status = os.waitpid(pid, 0)
    assert native.pidfd_exit_status(fd) == status == signal.SIGKILL


@pytest.mark.timeout(120)
def test_epoll_drain_200_children(native: NativeBackend, tracked: Procs) -> None:
    n = 200
    ep = native.epoll_set()
    expected: dict[int, tuple[int, int]] = {}  # token -> (fd, status)
    try:
        for i in range(n):
            _, fd = tracked.spawn([SH, "-c", f"exit {i}"])
            # Tokens beyond 32 bits and negative ones must round-trip too.
            token = i if i % 3 == 0 else (1 << 40) + i if i % 3 == 1 else -i
            ep.add(fd, token)
            expected[token] = (fd, i << 8)
        got: dict[int, int] = {}
        deadline = time.monotonic() + 60.0
        while len(got) < n and time.monotonic() < deadline:
            for ev in ep.drain(5.0, max_events=64):
                assert ev.token in expected, ev
                assert ev.token not in got, f"token {ev.token} reported twice"
                fd, status = expected[ev.token]
                assert ev.fd == fd
                assert ev.reaped, ev
                assert ev.status == status
                assert ev.rusage is not None and ev.rusage.maxrss_kb > 0
                got[ev.token] = ev.status
        assert len(got) == n
        assert ep.drain(0) == []
    finally:
        ep.close()
    for fd, _ in expected.values():
        with pytest.raises(ChildProcessError):  # every one of them was reaped by drain
            native.waitid_pidfd(fd)


@pytest.mark.timeout(60)
def test_epoll_drain_process_reaped_elsewhere(native: NativeBackend, tracked: Procs) -> None:
    ep = native.epoll_set()
    try:
        pid, fd = tracked.spawn([SH, "-c", "exit 9"])
        ep.add(fd, 7)
        _, status = os.waitpid(pid, 0)
        events = ep.drain(10.0)
        assert len(events) == 1
        ev = events[0]
        assert (ev.token, ev.fd, ev.reaped, ev.rusage) == (7, fd, False, None)
        assert ev.status == (status if HAS_EXIT_INFO else None)
        assert ep.drain(0) == []
    finally:
        ep.close()


@pytest.mark.timeout(60)
def test_epoll_remove_and_timeout(native: NativeBackend, tracked: Procs) -> None:
    ep = native.epoll_set()
    try:
        _, fd = tracked.spawn([SH, "-c", "exec sleep 30"])
        ep.add(fd, 1)
        assert ep.drain(0.01) == []
        ep.remove(fd)
        ep.remove(fd)  # not in the set any more: a no-op
        native.pidfd_send_signal(fd, signal.SIGKILL)
        native.wait_readable([fd], None)
        assert ep.drain(0) == []  # removed: not reported, not reaped
        reaped = native.waitid_pidfd(fd)
        assert reaped is not None and reaped.status == signal.SIGKILL
    finally:
        ep.close()
    ep.close()  # idempotent


def _depth(native: NativeBackend, root: int, pid: int) -> int:
    depth = 0
    while pid != root:
        st = native.proc_stat(pid)
        assert st is not None
        pid = st.ppid
        depth += 1
        assert depth < 10
    return depth


@pytest.mark.timeout(60)
def test_descendants_three_levels(native: NativeBackend, tracked: Procs) -> None:
    root, _ = tracked.spawn([SH, "-c", "sh -c 'sleep 30 & wait' & sleep 30 & wait"])
    found: list[int] = []

    def three() -> bool:
        found[:] = native.descendants([root])
        return len(found) >= 3

    _wait_until(three, "the three descendants")
    for pid in found:
        tracked.adopt(pid)
    assert len(found) == 3 and len(set(found)) == 3
    assert root not in found
    depths = [_depth(native, root, pid) for pid in found]
    assert sorted(depths) == [1, 1, 2]
    assert depths == sorted(depths), "breadth first"
    leaf = found[depths.index(2)]
    assert native.descendants([leaf]) == []
    middle = [pid for pid, d in zip(found, depths) if d == 1]
    # Roots are never reported, and a duplicate root changes nothing.
    assert set(native.descendants([root, *middle])) == {leaf}
    assert native.descendants([root, root]) == found
    assert native.descendants([]) == []
    assert root in native.descendants([os.getpid()])


@pytest.mark.timeout(60)
def test_descendants_include_zombies(native: NativeBackend, tracked: Procs) -> None:
    # The parent never reaps its child: the zombie is still a descendant.
    root, _ = tracked.python(
        "import os, time\nif os.fork() == 0:\n    os._exit(4)\ntime.sleep(30)\n"
    )
    found: list[int] = []

    def zombie_child() -> bool:
        found[:] = native.descendants([root])
        st = native.proc_stat(found[0]) if found else None
        return st is not None and st.state == "Z"

    _wait_until(zombie_child, "the zombie grandchild")
    tracked.adopt(found[0])  # a zombie still has a pidfd
    assert len(found) == 1
    st = native.proc_stat(found[0])
    assert st is not None and (st.ppid, st.exit_code) == (root, 4 << 8)


@pytest.mark.timeout(60)
def test_descendants_grows_buffer(native: NativeBackend, tracked: Procs) -> None:
    # More descendants than the first buffer guess of the wrapper (256).
    root, _ = tracked.spawn(
        [SH, "-c", "i=0; while [ $i -lt 300 ]; do sleep 30 & i=$((i+1)); done; wait"]
    )
    found: list[int] = []

    def all_up() -> bool:
        found[:] = native.descendants([root])
        return len(found) >= 300

    _wait_until(all_up, "300 children")
    for pid in found:
        tracked.adopt(pid)
    assert len(found) == len(set(found)) == 300


@pytest.mark.timeout(60)
def test_session_members(native: NativeBackend, tracked: Procs) -> None:
    leader, _ = tracked.spawn([SH, "-c", "sleep 30 & sleep 30 & wait"], setsid=True)
    members: list[int] = []

    def three() -> bool:
        members[:] = native.session_members(leader)
        return len(members) >= 3

    _wait_until(three, "the session's three members")
    children = native.descendants([leader])
    for pid in children:
        tracked.adopt(pid)
    assert sorted(members) == sorted([leader, *children])
    st = native.proc_stat(leader)
    assert st is not None and st.session == leader and st.pgrp == leader
    if os.getsid(0) > 0:  # 0: our session's leader is outside this PID namespace
        assert leader not in native.session_members(os.getsid(0))
    assert native.session_members(2**30 - 7) == []


@pytest.mark.timeout(60)
def test_proc_stat_zombie_and_self(native: NativeBackend, tracked: Procs) -> None:
    me = native.proc_stat(os.getpid())
    assert isinstance(me, ProcStat)
    assert me.state == "R"
    assert (me.ppid, me.pgrp, me.session) == (os.getppid(), os.getpgrp(), os.getsid(0))
    assert me.starttime > 0 and me.exit_code == 0

    pid, fd = tracked.spawn([SH, "-c", "exit 7"])
    native.wait_readable([fd], None)
    zombie = native.proc_stat(pid)
    assert zombie is not None
    assert (zombie.state, zombie.ppid, zombie.exit_code) == ("Z", os.getpid(), 7 << 8)
    reaped = native.waitid_pidfd(fd)
    assert reaped is not None and reaped.status == 7 << 8
    assert native.proc_stat(2**30 - 7) is None
    assert native.proc_stat(0) is None


def _bad(call: Callable[[], object]) -> OSError:
    with pytest.raises(OSError) as info:
        call()
    return info.value


@pytest.mark.timeout(60)
def test_bad_fds_raise_ebadf(native: NativeBackend, tracked: Procs) -> None:
    calls = [
        lambda: native.pidfd_send_signal(BAD_FD, 0),
        lambda: native.waitid_pidfd(BAD_FD),
        lambda: native.waitid_pidfd(-1),
        lambda: native.pidfd_exit_status(BAD_FD),
        lambda: native.wait_readable([BAD_FD], 0),
    ]
    for call in calls:
        assert _bad(call).errno == errno.EBADF
    ep = native.epoll_set()
    try:
        assert _bad(lambda: ep.add(BAD_FD, 1)).errno == errno.EBADF
    finally:
        ep.close()
    assert _bad(lambda: ep.drain(0)).errno == errno.EBADF  # closed set
    assert _bad(lambda: native.pidfd_open(-1)).errno in (errno.EINVAL, errno.ESRCH)
    assert isinstance(_bad(lambda: native.pidfd_open(2**30 - 7)), ProcessLookupError)

    _, fd = tracked.spawn([SH, "-c", "exec sleep 30"])
    assert native.pidfd_send_signal_many([BAD_FD, fd, -1], 0) == [errno.EBADF, 0, errno.EBADF]
    assert native.pidfd_send_signal_many([], 0) == []
    # A non-pidfd: PIDFD_GET_INFO says ENOTTY, which means "no exit info".
    r, w = os.pipe()
    try:
        assert native.pidfd_exit_status(r) is None
        assert _bad(lambda: native.pidfd_send_signal(r, 0)).errno == errno.EBADF
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.timeout(60)
def test_child_subreaper_round_trip(native: NativeBackend) -> None:
    before = native.get_child_subreaper()
    try:
        native.set_child_subreaper(True)
        assert native.get_child_subreaper() is True
        native.set_child_subreaper(False)
        assert native.get_child_subreaper() is False
    finally:
        native.set_child_subreaper(before)


@pytest.mark.timeout(60)
def test_signal_many_and_wait_readable_subset(native: NativeBackend, tracked: Procs) -> None:
    fds = [tracked.spawn([SH, "-c", "exec sleep 30"])[1] for _ in range(3)]
    assert native.pidfd_send_signal_many(fds[:2], signal.SIGTERM) == [0, 0]
    ready: list[int] = []

    def two_ready() -> bool:
        ready[:] = native.wait_readable(fds, 5.0)
        return len(ready) == 2

    _wait_until(two_ready, "two exits")
    assert ready == fds[:2]
    for fd in fds[:2]:
        assert native.waitid_pidfd(fd) is not None


class _Interrupted(Exception):
    pass


@pytest.mark.timeout(60)
def test_signal_handler_interrupts_blocking_waits(native: NativeBackend, tracked: Procs) -> None:
    """EINTR comes back to Python, so a raising handler (think Ctrl-C) ends the wait."""

    def raise_interrupted(signum: int, frame: object) -> None:
        raise _Interrupted

    _, fd = tracked.spawn([SH, "-c", "exec sleep 30"])
    ep = native.epoll_set()
    previous = signal.signal(signal.SIGUSR1, raise_interrupted)
    try:
        ep.add(fd, 1)
        waits: list[Callable[[], object]] = [
            lambda: native.waitid_pidfd(fd, nohang=False),
            lambda: native.wait_readable([fd], None),
            lambda: ep.drain(None),
        ]
        for wait in waits:
            timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
            timer.start()
            try:
                with pytest.raises(_Interrupted):
                    wait()
            finally:
                timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        ep.close()
