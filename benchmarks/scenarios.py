"""Scenarios S1-S8 of design section 7, for every backend of ours and every baseline.

Every child is the exec'd C helper ``stamp`` (benchmarks/stamp.c), which
stores CLOCK_MONOTONIC in a shared record just before ``_exit``; Python's
``time.monotonic_ns`` reads the same clock, so "wake minus stamp" is the
detection latency, with no syscall in the parent's hot path. The records live
in one MAP_SHARED file under /dev/shm (see :class:`Stamps`).

Ours is driven through the public API only: ``wait_for_dispatch_completion``,
``poll_dispatch_status``, ``graceful_terminate_dispatch``, ``spawn_dispatch``
(native backend: keeper containment) and ``DispatchMonitor`` when the package
has it. Children of "ours" rows are started with ``os.posix_spawn`` (no
``Popen`` bookkeeping) in a new session, as the Ralph loop starts dispatches
(``start_new_session=True``); the stdlib rows use ``Popen``/asyncio as their
users would.

Each contestant runs in turn in this process, which is a child subreaper;
after each one every process it left is SIGKILLed (through a pidfd) and
reaped, and that is reported.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import inspect
import json
import math
import mmap
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ralph_reaper import (
    DispatchCompletionStatus,
    DispatchResult,
    graceful_terminate_dispatch,
    poll_dispatch_status,
    wait_for_dispatch_completion,
)
from ralph_reaper import backends as rr_backends

from . import baselines as bl

REC_SIZE = 32  # struct rec in stamp.c: exit_ns, term_ns, pid, flags (int64 each)
REC_READY = 1
TICKET = "bench"
IDLE_SETTLE_S = 0.5

# --- parameters ------------------------------------------------------------------------


@dataclass
class Params:
    quick: bool
    s1_reps: int = 200
    s1_reps_seed100: int = 40
    s1_reps_seed1000: int = 12
    s1_base_ms: float = 5.0  # the child outlives this, so the waiter is blocked by then
    s1_jitter_ms: float = 10.0
    s2_sizes: tuple[int, ...] = (1000, 10000)
    s3_n: int = 10000
    s3_window_s: float = 10.0
    s4_reps: int = 100
    s4_ignore_reps: int = 30
    s4_kill_wait_ms: float = 200.0
    s5_n: int = 1000
    s5_reps: int = 5
    s5_settle_s: float = 1.0  # how long survivors of a stop call are given to die
    s6_reps: int = 100
    s6_mem_n: int = 1000
    s7_sizes: tuple[int, ...] = (0, 2000, 8000, 20000)
    s7_wait_reps: int = 60
    s7_stop_reps: int = 40
    s8_n: int = 3000
    s8_others: int = 200  # at most: other dispatches started one after the other meanwhile
    seed: int = 20240607

    @classmethod
    def make(cls, quick: bool) -> Params:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            s1_reps=5,
            s1_reps_seed100=3,
            s1_reps_seed1000=1,
            s2_sizes=(100,),
            s3_n=500,
            s3_window_s=2.0,
            s4_reps=4,
            s4_ignore_reps=3,
            s4_kill_wait_ms=100.0,
            s5_n=100,
            s5_reps=2,
            s5_settle_s=0.2,
            s6_reps=5,
            s6_mem_n=50,
            s7_sizes=(0, 200),
            s7_wait_reps=5,
            s7_stop_reps=4,
            s8_n=100,
            s8_others=20,
        )

    @property
    def capacity(self) -> int:
        s8 = self.s8_n + self.s8_others
        return max(max(self.s2_sizes), self.s3_n, self.s5_n, self.s6_mem_n, s8, 1)


# --- results ---------------------------------------------------------------------------


@dataclass
class Target:
    what: str
    target: str
    measured: str
    met: Optional[bool]  # None: could not be measured


@dataclass
class Table:
    key: str
    title: str
    protocol: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    ratio_title: str = ""
    ratio_header: list[str] = field(default_factory=list)
    ratio_rows: list[list[str]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Entry:
    """One contestant's figures in one scenario (None: skipped or failed)."""

    name: str
    kind: str  # "floor", "ours" or "baseline"
    how: str
    value: Any = None
    note: str = ""


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (p99 of fewer than 100 values is the maximum)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[rank - 1])


def fmt_ns(ns: Optional[float]) -> str:
    if ns is None:
        return "-"
    a = abs(ns)
    if a < 1e3:
        return f"{ns:.0f} ns"
    if a < 1e5:
        return f"{ns / 1e3:.1f} us"
    if a < 1e6:
        return f"{ns / 1e3:.0f} us"
    if a < 1e9:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def fmt_ratio(num: Optional[float], den: Optional[float]) -> str:
    if num is None or den is None or den <= 0:
        return "-"
    return f"{num / den:.2f}x"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    if abs(b) < 10 * 1024:
        return f"{b:.0f} B"
    return f"{b / 1024:.1f} KiB"


def met_text(met: Optional[bool]) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[met]


# --- shared stamp records --------------------------------------------------------------


class Stamps:
    """The records the stamp children write: a MAP_SHARED file, mapped once here.

    A /dev/shm file rather than a memfd so that children started by other
    launchers (``spawn_dispatch`` passes no extra fds) can open it by path.
    """

    def __init__(self, capacity: int) -> None:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        self.path = os.path.join(base, f"ralph-bench-{os.getpid()}-{secrets.token_hex(4)}")
        size = capacity * REC_SIZE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._q = memoryview(self._mm).cast("q")
        self.capacity = capacity

    def reset(self, n: int) -> None:
        self._mm[: n * REC_SIZE] = bytes(n * REC_SIZE)

    def exit_ns(self, slot: int) -> int:
        return int(self._q[slot * 4])

    def term_ns(self, slot: int) -> int:
        return int(self._q[slot * 4 + 1])

    def pid(self, slot: int) -> int:
        return int(self._q[slot * 4 + 2])

    def ready(self, slot: int) -> bool:
        return bool(self._q[slot * 4 + 3] & REC_READY)

    def close(self) -> None:
        self._q.release()
        self._mm.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# --- processes: /proc, cleanup ---------------------------------------------------------


def proc_stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(state, ppid, starttime) of ``pid``, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[19])


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (zombies included), from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                children.setdefault(st[1], []).append(int(name))
    out: list[int] = []
    frontier = [root]
    while frontier:
        nxt: list[int] = []
        for pid in frontier:
            for child in children.get(pid, ()):
                out.append(child)
                nxt.append(child)
        frontier = nxt
    return out


def _kill_pid(pid: int, sig: int) -> None:
    """Signal a process through a pidfd (only processes this benchmark started)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reap_children() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def sweep(timeout_s: float = 30.0) -> int:
    """SIGKILL and reap every descendant of this process; return how many there were.

    Only called between contestants, when nothing of ours should be running:
    anything found was left behind.
    """
    me = os.getpid()
    found = descendants(me)
    count = len(found)
    deadline = time.monotonic() + timeout_s
    while found:
        for pid in found:
            st = proc_stat(pid)
            if st is not None and st[0] not in ("Z", "X"):
                _kill_pid(pid, signal.SIGKILL)
        _reap_children()
        found = descendants(me)
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    return count


def alive_members(pids: Sequence[int], starts: Sequence[int]) -> tuple[list[int], list[int]]:
    """(live, zombie) members of a recorded tree; a recycled pid does not count."""
    live: list[int] = []
    zombies: list[int] = []
    for pid, start in zip(pids, starts):
        st = proc_stat(pid)
        if st is None or st[2] != start:
            continue
        if st[0] == "Z":
            zombies.append(pid)
        elif st[0] != "X":
            live.append(pid)
    return live, zombies


# --- optional parts of the package ----------------------------------------------------


def load_monitor() -> Any:
    """``ralph_reaper.monitor.DispatchMonitor`` when the package has it, else None."""
    try:
        from ralph_reaper.monitor import DispatchMonitor
    except ImportError:
        return None
    return DispatchMonitor


def load_spawn_dispatch() -> Any:
    try:
        from ralph_reaper.spawning import spawn_dispatch
    except ImportError:
        return None
    return spawn_dispatch


def load_popen() -> Any:
    """``ralph_reaper.Popen``, or None in a build that predates it."""
    import ralph_reaper

    return getattr(ralph_reaper, "Popen", None)


def keeper_available() -> bool:
    try:
        from ralph_reaper.keeper_path import keeper_path
    except ImportError:
        return False
    return keeper_path() is not None


def dispatch_result(pid: int) -> DispatchResult:
    return DispatchResult(f"{TICKET}-{pid}", TICKET, "launched", pid, None)


def monitor_watch(monitor: Any, dispatch: DispatchResult) -> concurrent.futures.Future[Any]:
    """``monitor.watch`` for one dispatch, whatever the exact parameter names are."""
    watch = monitor.watch
    if "ticket_id" in inspect.signature(watch).parameters:
        return watch(dispatch, ticket_id=TICKET)  # type: ignore[no-any-return]
    return watch(dispatch)  # type: ignore[no-any-return]


def _check_completed(result: Any, what: str) -> None:
    if result.status is not DispatchCompletionStatus.COMPLETED:
        raise RuntimeError(f"{what}: {result.status.value} ({result.error})")


# --- the benchmark context -------------------------------------------------------------


class Bench:
    def __init__(
        self,
        params: Params,
        backends: Sequence[str],
        stamp: str,
        floor: str,
        log: Callable[[str], None],
        crowd: str = "",
    ) -> None:
        self.params = params
        self.backends = list(backends)
        self.stamp = stamp
        self.floor = floor
        self.crowd = crowd
        self.log = log
        self.rng = random.Random(params.seed)
        self.stamps = Stamps(params.capacity)
        self.errors: list[str] = []
        self.leftovers: list[str] = []
        self.spawn_dispatch = load_spawn_dispatch()
        self.keeper = bool("native" in self.backends and self.spawn_dispatch and keeper_available())

    def close(self) -> None:
        self.stamps.close()

    # children

    def argv(
        self,
        slot: int = 0,
        *,
        stamped: bool = True,
        wait_fd: Optional[int] = None,
        delay_us: int = 0,
        mode: str = "",
        tree: int = 0,
    ) -> list[str]:
        argv = [self.stamp]
        if stamped:
            argv += ["-f", self.stamps.path, "-s", str(slot)]
        if wait_fd is not None:
            argv += ["-w", str(wait_fd)]
        if delay_us:
            argv += ["-d", str(delay_us)]
        if mode:
            argv.append(f"-{mode}")
        if tree:
            argv += ["-T", str(tree)]
        return argv

    def spawn(self, argv: list[str], setsid: bool = True) -> int:
        return os.posix_spawn(
            argv[0],
            argv,
            os.environ,
            setsid=setsid,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )

    def wait_ready(self, n: int, first: int = 0, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        slot = first
        while slot < first + n:
            if self.stamps.ready(slot):
                slot += 1
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"stamp child in slot {slot} never became ready")
            time.sleep(0.0005)

    def s1_delay_us(self, jitter_ms: float) -> int:
        p = self.params
        return int((p.s1_base_ms + self.rng.random() * jitter_ms) * 1000.0)

    def floor_lines(self, *args: Any, timeout_s: float = 600.0) -> list[list[int]]:
        cmd = [self.floor, args[0], self.stamp, *map(str, args[1:])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"floor {args[0]} failed: {out.stderr.strip()}")
        return [[int(x) for x in line.split()] for line in out.stdout.splitlines() if line]

    # running contestants

    def attempt(self, label: str, fn: Callable[[], Any]) -> Any:
        """Run one contestant; an error is reported, never fatal; clean up after it."""
        self.log(f"  {label} ...")
        t0 = time.monotonic()
        try:
            return fn()
        except Exception as exc:
            self.errors.append(f"{label}: {type(exc).__name__}: {exc}")
            self.log(traceback.format_exc())
            return None
        finally:
            left = sweep()
            if left:
                self.leftovers.append(f"{label}: {left} process(es) left, killed and reaped")
            self.log(f"  {label}: {time.monotonic() - t0:.1f} s")

    def ours(self, backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with rr_backends.using(backend):
                return fn()

        return run


# --- S1: single exit latency -----------------------------------------------------------


def _s1_loop(
    b: Bench, reps: int, jitter_ms: float, spawn: Callable[[list[str]], Any], wait: Callable
) -> list[int]:
    lats = []
    for _ in range(reps):
        b.stamps.reset(1)
        handle = spawn(b.argv(0, delay_us=b.s1_delay_us(jitter_ms)))
        wait(handle)
        woke = time.monotonic_ns()
        stamp = b.stamps.exit_ns(0)
        if stamp == 0:
            raise RuntimeError("the child exited without a stamp")
        lats.append(woke - stamp)
    return lats


def _ours_wait(pid: int) -> None:
    _check_completed(wait_for_dispatch_completion(dispatch_result(pid), TICKET), "wait")


def _ours_wait_no_sweep(pid: int) -> None:
    result = wait_for_dispatch_completion(dispatch_result(pid), TICKET, stop_leftovers=False)
    _check_completed(result, "wait")


def _keeper_spawn(b: Bench, argv: list[str], stdin: str = "devnull") -> DispatchResult:
    d: DispatchResult = b.spawn_dispatch(argv, ticket_id=TICKET, stdin=stdin)
    if d.status != "launched":
        raise RuntimeError(f"spawn_dispatch failed: {d.error}")
    return d


def _asyncio_s1(b: Bench, reps: int) -> list[int]:
    import asyncio

    async def main() -> list[int]:
        lats = []
        for _ in range(reps):
            b.stamps.reset(1)
            argv = b.argv(0, delay_us=b.s1_delay_us(b.params.s1_jitter_ms))
            proc = await asyncio.create_subprocess_exec(*argv, start_new_session=True)
            await proc.wait()
            woke = time.monotonic_ns()
            lats.append(woke - b.stamps.exit_ns(0))
        return lats

    return bl.asyncio_run(main())


def s1_latency(b: Bench) -> Table:
    p = b.params
    jit = p.s1_jitter_ms
    entries: list[Entry] = []

    def add(name: str, kind: str, how: str, fn: Callable[[], Any]) -> None:
        entries.append(Entry(name, kind, how, b.attempt(f"S1 {name}", fn)))

    base_us, jitter_us = int(p.s1_base_ms * 1000), int(jit * 1000)
    add(
        "floor",
        "floor",
        "C: fork+exec, blocking waitid(P_PID)",
        lambda: [x[0] for x in b.floor_lines("latency", p.s1_reps, base_us, jitter_us)],
    )
    for name in b.backends:
        add(
            name,
            "ours",
            "wait_for_dispatch_completion(pid)",
            b.ours(name, lambda: _s1_loop(b, p.s1_reps, jit, b.spawn, _ours_wait)),
        )
    for name in b.backends:
        add(
            f"{name}, stop_leftovers=False",
            "ours",
            "the same, without the session sweep after the exit",
            b.ours(name, lambda: _s1_loop(b, p.s1_reps, jit, b.spawn, _ours_wait_no_sweep)),
        )
    if b.keeper:

        def keeper_run() -> list[int]:
            def wait(d: DispatchResult) -> None:
                _check_completed(wait_for_dispatch_completion(d, TICKET), "wait")

            return _s1_loop(b, p.s1_reps, jit, lambda a: _keeper_spawn(b, a), wait)

        add(
            "native+keeper",
            "ours",
            "spawn_dispatch + wait_for_dispatch_completion",
            b.ours("native", keeper_run),
        )
    add(
        "python waitpid",
        "baseline",
        "os.waitpid(pid, 0), blocking",
        lambda: _s1_loop(b, p.s1_reps, jit, b.spawn, lambda pid: os.waitpid(pid, 0)),
    )
    for interval, reps in ((1000, p.s1_reps_seed1000), (100, p.s1_reps_seed100)):
        add(
            f"seed-poll {interval} ms",
            "baseline",
            f"waitpid(WNOHANG) every {interval} ms",
            lambda i=interval, r=reps: _s1_loop(
                b,
                r,
                max(jit, float(i)),
                b.spawn,
                lambda pid: bl.seed_wait_for_dispatch_completion(pid, poll_interval_ms=i),
            ),
        )
    add(
        "stdlib Popen.wait",
        "baseline",
        "Popen.wait(timeout=1) loop",
        lambda: _s1_loop(
            b,
            p.s1_reps,
            jit,
            lambda a: subprocess.Popen(a, start_new_session=True),
            bl.popen_wait_loop,
        ),
    )
    add(
        "stdlib asyncio",
        "baseline",
        "create_subprocess_exec + wait()",
        lambda: _asyncio_s1(b, p.s1_reps),
    )
    if bl.psutil is not None:
        add(
            "psutil",
            "baseline",
            "psutil.Process(pid).wait()",
            lambda: _s1_loop(b, p.s1_reps, jit, b.spawn, bl.psutil_wait),
        )
    else:
        entries.append(Entry("psutil", "baseline", "not installed: skipped"))

    table = Table(
        "S1",
        "S1: single exit, detection latency",
        "One child at a time, in a new session; it sleeps 5 ms + uniform jitter "
        f"({jit:.0f} ms; for seed-poll one poll interval, so the exit falls at a random "
        "phase of the poll) and stamps CLOCK_MONOTONIC just before _exit. Latency = "
        "when the wait call returned (exit reaped, result built) minus the stamp.",
        ["contestant", "how", "n", "p50", "p99", "p50 / floor", "p99 / floor"],
    )
    floor = _stats(entries[0].value)
    for e in entries:
        st = _stats(e.value)
        if st is None:
            table.rows.append([e.name, e.how, "-", "-", "-", "-", "-"])
            continue
        table.rows.append(
            [
                e.name,
                e.how,
                str(st[2]),
                fmt_ns(st[0]),
                fmt_ns(st[1]),
                fmt_ratio(st[0], floor and floor[0]),
                fmt_ratio(st[1], floor and floor[1]),
            ]
        )
        if e.kind == "ours" and "stop_leftovers=False" not in e.name:
            # The drop-in wait with its leftovers sweep is what is held to a target;
            # the rows without the sweep show what the sweep costs.
            limit = 2.5 if "keeper" in e.name else 1.5
            met = None if floor is None else st[0] <= limit * floor[0]
            r50 = fmt_ratio(st[0], floor and floor[0])
            r99 = fmt_ratio(st[1], floor and floor[1])
            table.targets.append(
                Target(
                    f"S1 {e.name}: p50 (p99 beside it)",
                    f"<= {limit}x floor",
                    f"{r50} ({r99})",
                    met,
                )
            )
    _ratio_matrix(table, entries, lambda v: _p(v, 50), "p50")
    return table


def _stats(values: Optional[Sequence[int]]) -> Optional[tuple[float, float, int]]:
    if not values:
        return None
    return float(statistics.median(values)), percentile(values, 99), len(values)


def _p(values: Any, q: float) -> Optional[float]:
    if not values:
        return None
    return percentile(values, q) if q != 50 else float(statistics.median(values))


def _ratio_matrix(
    table: Table,
    entries: Sequence[Entry],
    metric: Callable[[Any], Optional[float]],
    label: str,
    row_suffix: str = "",
) -> None:
    """Add rows "ours / each baseline" of ``metric`` (the header comes from the first call)."""
    ours = [e for e in entries if e.kind == "ours"]
    others = [e for e in entries if e.kind != "ours"]
    if not ours or not others:
        return

    def of(e: Entry) -> Optional[float]:
        return None if e.value is None else metric(e.value)

    if not table.ratio_header:
        table.ratio_title = f"ours / baseline ({label}; below 1 means ours is faster or cheaper)"
        table.ratio_header = ["ours", *(e.name for e in others)]
    for e in ours:
        cells = [fmt_ratio(of(e), of(o)) for o in others]
        table.ratio_rows.append([e.name + row_suffix, *cells])


# --- S2: burst -------------------------------------------------------------------------


@dataclass
class Burst:
    n: int
    wall_ns: int
    cpu_ns: int
    children_ns: int  # last stamp - release: the children's own share of the wall time


class Blocked:
    """N stamp children blocked reading one pipe; closing its write end releases them."""

    def __init__(self, b: Bench, n: int, spawn: Callable[[list[str], int], Any]) -> None:
        self.b = b
        self.n = n
        self.r, self.w = os.pipe()  # both close-on-exec ...
        os.set_inheritable(self.r, True)  # ... but children need the read end
        self.handles: list[Any] = []
        b.stamps.reset(n)
        try:
            for i in range(n):
                self.handles.append(spawn(b.argv(i, wait_fd=self.r), self.r))
            b.wait_ready(n)
        except BaseException:
            self.close()
            raise
        self.t0 = self.c0 = 0

    def release(self) -> None:
        self.c0 = time.process_time_ns()
        self.t0 = time.monotonic_ns()
        os.close(self.w)
        self.w = -1

    def done(self) -> Burst:
        t1 = time.monotonic_ns()
        c1 = time.process_time_ns()
        stamps = [self.b.stamps.exit_ns(i) for i in range(self.n)]
        if not all(stamps):
            raise RuntimeError(f"{stamps.count(0)} children exited without a stamp")
        return Burst(self.n, t1 - self.t0, c1 - self.c0, max(stamps) - self.t0)

    def close(self) -> None:
        for fd in (self.w, self.r):
            if fd >= 0:
                os.close(fd)
        self.w = self.r = -1


def _posix_blocked(b: Bench) -> Callable[[list[str], int], int]:
    return lambda argv, _r: b.spawn(argv, setsid=False)


def _psutil_blocked(b: Bench) -> Callable[[list[str], int], Any]:
    """Spawn, and make the psutil.Process a psutil user would hold (outside the timing)."""
    return lambda argv, _r: bl.psutil.Process(b.spawn(argv, setsid=False))


def _popen_blocked(argv: list[str], r: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, pass_fds=(r,))


def _ours_many(b: Bench, n: int, idle_s: float = 0.0) -> tuple[Burst, Optional[float], str]:
    """Watch n blocked dispatches with the public API; optionally measure idle CPU first.

    With ``DispatchMonitor``: one ``watch`` per dispatch. Without it: idle
    watching is a ``poll_dispatch_status`` round every second, and the burst
    is ``wait_for_dispatch_completion`` for each dispatch in turn.
    """
    blocked = Blocked(b, n, _posix_blocked(b))
    pids = list(blocked.handles)
    idle_pct = None
    try:
        monitor_cls = load_monitor()
        if monitor_cls is not None:
            monitor = monitor_cls()
            try:
                futures = [monitor_watch(monitor, dispatch_result(pid)) for pid in pids]
                if idle_s:
                    # watch() hands the work to the monitor thread: let it register
                    # every pidfd first, so that the window measures watching only.
                    time.sleep(IDLE_SETTLE_S)
                    idle_pct = _idle_cpu(lambda: time.sleep(idle_s))
                blocked.release()
                concurrent.futures.wait(futures)
                burst = blocked.done()
            finally:
                monitor.close()
            for fut in futures:
                _check_completed(fut.result(), "monitor")
            return burst, idle_pct, "DispatchMonitor.watch"
        if idle_s:
            idle_pct = _idle_cpu(lambda: _poll_rounds(pids, idle_s))
        blocked.release()
        for pid in pids:
            _ours_wait(pid)
        return blocked.done(), idle_pct, "no DispatchMonitor: wait_for_dispatch_completion in turn"
    finally:
        blocked.close()


def _poll_rounds(pids: Sequence[int], window_s: float) -> None:
    until = time.monotonic() + window_s
    while True:
        for pid in pids:
            poll_dispatch_status(pid)
        left = until - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(1.0, left))


def _idle_cpu(fn: Callable[[], Any]) -> float:
    """Percent of one core this process used while ``fn`` ran."""
    c0 = time.process_time_ns()
    t0 = time.monotonic_ns()
    fn()
    c1 = time.process_time_ns()
    t1 = time.monotonic_ns()
    return 100.0 * (c1 - c0) / max(1, t1 - t0)


def _burst_python(b: Bench, n: int, spawn: Callable, wait_all: Callable[[list[Any]], Any]) -> Burst:
    blocked = Blocked(b, n, spawn)
    try:
        blocked.release()
        wait_all(blocked.handles)
        return blocked.done()
    finally:
        blocked.close()


def _waitpid_all(pids: list[int]) -> None:
    for _ in pids:
        os.waitpid(-1, 0)


def _asyncio_many(b: Bench, n: int, idle_s: float = 0.0) -> tuple[Burst, Optional[float]]:
    import asyncio

    async def main() -> tuple[Burst, Optional[float]]:
        r, w = os.pipe()
        os.set_inheritable(r, True)
        b.stamps.reset(n)
        procs = []
        try:
            for i in range(n):
                argv = b.argv(i, wait_fd=r)
                procs.append(await asyncio.create_subprocess_exec(*argv, pass_fds=(r,)))
            for slot in range(n):
                while not b.stamps.ready(slot):
                    await asyncio.sleep(0.0005)
            waits = [asyncio.ensure_future(p.wait()) for p in procs]
            idle_pct = None
            if idle_s:
                c0, t0 = time.process_time_ns(), time.monotonic_ns()
                await asyncio.sleep(idle_s)
                c1, t1 = time.process_time_ns(), time.monotonic_ns()
                idle_pct = 100.0 * (c1 - c0) / (t1 - t0)
            c0, t0 = time.process_time_ns(), time.monotonic_ns()
            os.close(w)
            w = -1
            await asyncio.gather(*waits)
            t1, c1 = time.monotonic_ns(), time.process_time_ns()
            stamps = [b.stamps.exit_ns(i) for i in range(n)]
            return Burst(n, t1 - t0, c1 - c0, max(stamps) - t0), idle_pct
        finally:
            if w >= 0:
                os.close(w)
            os.close(r)
            for p in procs:
                if p.returncode is None:
                    await p.wait()

    return bl.asyncio_run(main())


def s2_burst(b: Bench) -> Table:
    p = b.params
    table = Table(
        "S2",
        "S2: burst, N children released at the same instant",
        "N children block reading one pipe; closing its write end releases them all. "
        "Wall = from that close to the moment every exit is detected and reaped; CPU = this "
        "process's own CPU time (all threads, children excluded) over the same span, per "
        "exit; 'children' = last stamp - release, the part of the wall time the children "
        "themselves take (on this machine's cores) whoever waits. Burst children stay in "
        "the benchmark's session.",
        ["N", "contestant", "how", "wall", "CPU per exit", "children", "wall / floor"],
    )
    cpu_by: dict[tuple[int, str], float] = {}
    for n in p.s2_sizes:
        entries: list[Entry] = []

        def add(
            name: str,
            kind: str,
            how: str,
            fn: Callable[[], Any],
            n: int = n,
            entries: list[Entry] = entries,
        ) -> None:
            entries.append(Entry(name, kind, how, b.attempt(f"S2 N={n} {name}", fn)))

        def floor_burst(n: int = n) -> Burst:
            wall, cpu, children, reaped = b.floor_lines("burst", n)[0]
            if reaped != n:
                raise RuntimeError(f"floor reaped {reaped} of {n}")
            return Burst(n, wall, cpu, children)

        add("floor", "floor", "C: blocking waitid(P_ALL) loop", floor_burst)
        how_ours = (
            "DispatchMonitor.watch" if load_monitor() else "wait_for_dispatch_completion in turn"
        )
        for name in b.backends:
            add(name, "ours", how_ours, b.ours(name, lambda n=n: _ours_many(b, n)[0]))
        add(
            "python waitpid",
            "baseline",
            "os.waitpid(-1, 0) loop",
            lambda n=n: _burst_python(b, n, _posix_blocked(b), _waitpid_all),
        )
        for interval in (1000, 100):
            add(
                f"seed-poll {interval} ms",
                "baseline",
                "seed wait, one dispatch after the other",
                lambda n=n, i=interval: _burst_python(
                    b, n, _posix_blocked(b), lambda pids: bl.seed_wait_many(pids, i)
                ),
            )
        add(
            "stdlib Popen.wait",
            "baseline",
            "Popen.wait(timeout) loop, in turn",
            lambda n=n: _burst_python(b, n, _popen_blocked, bl.popen_wait_many),
        )
        add("stdlib asyncio", "baseline", "gather(proc.wait())", lambda n=n: _asyncio_many(b, n)[0])
        if bl.psutil is not None:
            add(
                "psutil",
                "baseline",
                "psutil.wait_procs",
                lambda n=n: _burst_python(b, n, _psutil_blocked(b), bl.psutil.wait_procs),
            )
        floor = entries[0].value
        for e in entries:
            v: Optional[Burst] = e.value
            if v is None:
                table.rows.append([str(n), e.name, e.how, "-", "-", "-", "-"])
                continue
            cpu_by[(n, e.name)] = v.cpu_ns / n
            table.rows.append(
                [
                    str(n),
                    e.name,
                    e.how,
                    fmt_ns(v.wall_ns),
                    fmt_ns(v.cpu_ns / n),
                    fmt_ns(v.children_ns),
                    fmt_ratio(v.wall_ns, floor and floor.wall_ns),
                ]
            )
            if e.kind == "ours":
                table.targets.append(
                    Target(
                        f"S2 N={n} {e.name}: wall",
                        "<= 1.1x floor",
                        fmt_ratio(v.wall_ns, floor and floor.wall_ns),
                        None if floor is None else v.wall_ns <= 1.1 * floor.wall_ns,
                    )
                )
        if (n, "native") in cpu_by and (n, "pure") in cpu_by:
            nat, pur = cpu_by[(n, "native")], cpu_by[(n, "pure")]
            flo = None if floor is None else floor.cpu_ns / n
            table.targets.append(
                Target(
                    f"S2 N={n}: host CPU per exit, native vs the C floor and vs pure",
                    "<= 2x floor and <= 0.5x pure",
                    f"{fmt_ns(nat)} vs {fmt_ns(flo)} ({fmt_ratio(nat, flo)}) and "
                    f"{fmt_ns(pur)} ({fmt_ratio(nat, pur)})",
                    None if flo is None else nat <= 2.0 * flo and nat <= pur / 2.0,
                )
            )
        _ratio_matrix(table, entries, lambda v: float(v.wall_ns), "wall", f" (N={n})")
    return table


# --- S3: idle watching -----------------------------------------------------------------


def _idle_python(
    b: Bench, n: int, spawn: Callable, watch: Callable[[list[Any], float], Any], finish: Callable
) -> float:
    blocked = Blocked(b, n, spawn)
    try:
        window = b.params.s3_window_s
        pct = _idle_cpu(lambda: watch(blocked.handles, window))
        blocked.release()
        finish(blocked.handles)
        return pct
    finally:
        blocked.close()


def s3_idle(b: Bench) -> Table:
    p = b.params
    n, window = p.s3_n, p.s3_window_s
    entries: list[Entry] = []

    def add(name: str, kind: str, how: str, fn: Callable[[], Any]) -> None:
        entries.append(Entry(name, kind, how, b.attempt(f"S3 {name}", fn)))

    def floor_idle() -> float:
        cpu, win = b.floor_lines("idle", n, int(window * 1000))[0]
        return 100.0 * cpu / win

    add("floor", "floor", "C: blocking waitid(P_ALL)", floor_idle)
    monitor = load_monitor() is not None
    how_ours = (
        "DispatchMonitor.watch"
        if monitor
        else "no DispatchMonitor: poll_dispatch_status round every 1 s"
    )
    for name in b.backends:
        add(name, "ours", how_ours, b.ours(name, lambda: _ours_many(b, n, window)[1]))
    for interval in (1000, 100):
        add(
            f"seed-poll {interval} ms",
            "baseline",
            f"waitpid(WNOHANG) round every {interval} ms",
            lambda i=interval: _idle_python(
                b,
                n,
                _posix_blocked(b),
                lambda pids, w: bl.seed_poll_rounds(pids, i, time.monotonic() + w),
                lambda pids: bl.seed_wait_many(pids, i),
            ),
        )
    add(
        "stdlib Popen.poll",
        "baseline",
        "Popen.poll() round every 1 s",
        lambda: _idle_python(
            b,
            n,
            _popen_blocked,
            lambda procs, w: bl.popen_poll_rounds(procs, 1.0, time.monotonic() + w),
            bl.popen_wait_many,
        ),
    )
    add(
        "stdlib asyncio",
        "baseline",
        "pending proc.wait() (pidfd watcher)",
        lambda: _asyncio_many(b, n, window)[1],
    )
    if bl.psutil is not None:
        add(
            "psutil",
            "baseline",
            "psutil.wait_procs(timeout=window)",
            lambda: _idle_python(
                b,
                n,
                _psutil_blocked(b),
                lambda procs, w: bl.psutil.wait_procs(procs, timeout=w),
                bl.psutil.wait_procs,
            ),
        )
    table = Table(
        "S3",
        f"S3: {n} idle dispatches watched for {window:.0f} s",
        f"{n} children block on a pipe while each contestant watches them for {window:.0f} s; "
        "host CPU = this process's CPU time over the window (all threads), in percent of one "
        "core. Then they are released and reaped (not measured).",
        ["contestant", "how", "host CPU (% of a core)", "x floor"],
    )
    floor = entries[0].value
    for e in entries:
        v = e.value
        table.rows.append([e.name, e.how, "-" if v is None else f"{v:.3f} %", fmt_ratio(v, floor)])
        if e.kind == "ours":
            limit = 1.0 if e.name.startswith("polling") else 0.1
            table.targets.append(
                Target(
                    f"S3 {e.name}: host CPU",
                    f"< {limit:g} % of a core",
                    "-" if v is None else f"{v:.3f} %",
                    None if v is None else v < limit,
                )
            )
    _ratio_matrix(table, entries, lambda v: float(v), "CPU")
    return table


# --- S4: stop --------------------------------------------------------------------------


def _s4_loop(
    b: Bench, reps: int, mode: str, spawn: Callable[[list[str]], Any], stop: Callable[[Any], Any]
) -> list[int]:
    """Run ``stop`` on a ready child ``reps`` times; return exit-to-return times (ns)."""
    kw_ns = int(b.params.s4_kill_wait_ms * 1e6)
    lats = []
    for _ in range(reps):
        b.stamps.reset(1)
        handle = spawn(b.argv(0, mode=mode))
        b.wait_ready(1)
        stop(handle)
        woke = time.monotonic_ns()
        ref = b.stamps.exit_ns(0) if mode == "t" else b.stamps.term_ns(0) + kw_ns
        if ref <= kw_ns:
            raise RuntimeError("the child recorded no stamp")
        lats.append(woke - ref)
    return lats


def _ours_stop(kill_wait_ms: float, expect: str) -> Callable[[int], None]:
    def stop(pid: int) -> None:
        ok, method = graceful_terminate_dispatch(pid, kill_wait_ms=kill_wait_ms)
        if not ok or method != expect:
            raise RuntimeError(f"graceful_terminate_dispatch: {ok}, {method} (expected {expect})")

    return stop


def _asyncio_s4(b: Bench, reps: int, mode: str, kill_wait_s: float) -> list[int]:
    import asyncio

    kw_ns = int(b.params.s4_kill_wait_ms * 1e6)

    async def main() -> list[int]:
        lats = []
        for _ in range(reps):
            b.stamps.reset(1)
            proc = await asyncio.create_subprocess_exec(
                *b.argv(0, mode=mode), start_new_session=True
            )
            while not b.stamps.ready(0):
                await asyncio.sleep(0.0005)
            await bl.asyncio_stop(proc, kill_wait_s)
            woke = time.monotonic_ns()
            ref = b.stamps.exit_ns(0) if mode == "t" else b.stamps.term_ns(0) + kw_ns
            lats.append(woke - ref)
        return lats

    return bl.asyncio_run(main())


def s4_stop(b: Bench) -> Table:
    p = b.params
    kw = p.s4_kill_wait_ms
    table = Table(
        "S4",
        "S4: stop a dispatch, from the leader's exit to the return of the stop call",
        "cooperative: the child exits on SIGTERM, stamping just before _exit; time = return "
        "of the stop call - that stamp. SIGTERM-ignoring: the child stamps when SIGTERM "
        f"arrives and only SIGKILL ends it; kill_wait = {kw:.0f} ms; time = return - (SIGTERM "
        "stamp + kill_wait), i.e. from the earliest moment SIGKILL may be sent, an upper "
        "bound of exit-to-return (a SIGKILLed process cannot stamp). Children in a new session.",
        ["mode", "contestant", "how", "n", "p50", "p99", "p99 / floor"],
    )
    for mode, label, reps, expect, kill_wait in (
        ("t", "cooperative", p.s4_reps, "sigterm", 5000.0),
        ("i", "SIGTERM-ignoring", p.s4_ignore_reps, "sigkill", kw),
    ):
        entries: list[Entry] = []

        def add(
            name: str,
            kind: str,
            how: str,
            fn: Callable[[], Any],
            label: str = label,
            entries: list[Entry] = entries,
        ) -> None:
            entries.append(Entry(name, kind, how, b.attempt(f"S4 {label} {name}", fn)))

        floor_mode = "coop" if mode == "t" else "ignore"
        add(
            "floor",
            "floor",
            "C: kill(), blocking waitid",
            lambda fm=floor_mode, r=reps: [x[0] for x in b.floor_lines("stop", r, fm, int(kw))],
        )
        for name in b.backends:
            add(
                name,
                "ours",
                "graceful_terminate_dispatch(pid)",
                b.ours(
                    name,
                    lambda m=mode, r=reps, e=expect, k=kill_wait: _s4_loop(
                        b, r, m, b.spawn, _ours_stop(k, e)
                    ),
                ),
            )
        if b.keeper:

            def keeper_stop(d: DispatchResult, k: float = kill_wait, e: str = expect) -> None:
                assert d.pid is not None
                _ours_stop(k, e)(d.pid)

            add(
                "native+keeper",
                "ours",
                "spawn_dispatch + graceful_terminate_dispatch",
                b.ours(
                    "native",
                    lambda m=mode, r=reps, f=keeper_stop: _s4_loop(
                        b, r, m, lambda a: _keeper_spawn(b, a), f
                    ),
                ),
            )
        add(
            "seed-poll",
            "baseline",
            "SIGTERM, poll every 100 ms; SIGKILL, every 50 ms",
            lambda m=mode, r=reps, k=kill_wait: _s4_loop(
                b, r, m, b.spawn, lambda pid: bl.seed_graceful_terminate_dispatch(pid, k)
            ),
        )
        add(
            "stdlib Popen",
            "baseline",
            "terminate, wait(timeout), kill, wait",
            lambda m=mode, r=reps, k=kill_wait: _s4_loop(
                b,
                r,
                m,
                lambda a: subprocess.Popen(a, start_new_session=True),
                lambda proc: bl.popen_stop(proc, k / 1000.0),
            ),
        )
        add(
            "stdlib asyncio",
            "baseline",
            "terminate, wait_for(wait()), kill",
            lambda m=mode, r=reps, k=kill_wait: _asyncio_s4(b, r, m, k / 1000.0),
        )
        if bl.psutil is not None:
            add(
                "psutil",
                "baseline",
                "terminate, wait(timeout), kill",
                lambda m=mode, r=reps, k=kill_wait: _s4_loop(
                    b,
                    r,
                    m,
                    b.spawn,
                    lambda pid: bl.psutil_stop(bl.psutil.Process(pid), k / 1000.0),
                ),
            )
        floor = _stats(entries[0].value)
        for e in entries:
            st = _stats(e.value)
            if st is None:
                table.rows.append([label, e.name, e.how, "-", "-", "-", "-"])
                continue
            table.rows.append(
                [
                    label,
                    e.name,
                    e.how,
                    str(st[2]),
                    fmt_ns(st[0]),
                    fmt_ns(st[1]),
                    fmt_ratio(st[1], floor and floor[1]),
                ]
            )
            if e.kind == "ours":
                table.targets.append(
                    Target(f"S4 {label} {e.name}: p99", "<= 2 ms", fmt_ns(st[1]), st[1] <= 2e6)
                )
        if mode == "t":
            _ratio_matrix(table, entries, lambda v: _p(v, 99), "p99, cooperative")
    return table


# --- S5: tree --------------------------------------------------------------------------


@dataclass
class TreeRun:
    stop_ns: int
    zero_ns: Optional[int]  # None: survivors remained for a second after the stop returned
    survivors: int
    zombies: int


def _tree_loop(
    b: Bench, reps: int, spawn: Callable[[list[str]], Any], stop: Callable[[Any], Any]
) -> list[TreeRun]:
    n = b.params.s5_n
    runs = []
    for _ in range(reps):
        b.stamps.reset(n)
        handle = spawn(b.argv(0, tree=n))
        b.wait_ready(n, timeout_s=60.0)
        pids = [b.stamps.pid(k) for k in range(n)]
        starts = []
        for pid in pids:
            st = proc_stat(pid)
            starts.append(-1 if st is None else st[2])
        t0 = time.monotonic_ns()
        stop(handle)
        t1 = time.monotonic_ns()
        live, zombies = alive_members(pids, starts)
        survivors = len(live)
        zero: Optional[int] = t1 - t0
        if live:
            zero = None
            limit = time.monotonic() + b.params.s5_settle_s
            while time.monotonic() < limit:
                live, _z = alive_members(live, [starts[pids.index(x)] for x in live])
                if not live:
                    zero = time.monotonic_ns() - t0
                    break
                time.sleep(0.001)
        runs.append(TreeRun(t1 - t0, zero, survivors, len(zombies)))
        sweep()  # whatever the contestant left, before the next tree
    return runs


def _popen_tree(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, start_new_session=True)


def s5_tree(b: Bench) -> Table:
    p = b.params
    n, reps = p.s5_n, p.s5_reps
    entries: list[Entry] = []

    def add(name: str, kind: str, how: str, fn: Callable[[], Any]) -> None:
        entries.append(Entry(name, kind, how, b.attempt(f"S5 {name}", fn)))

    def floor_tree() -> list[TreeRun]:
        out = []
        for wall, reaped in b.floor_lines("tree", n, reps):
            out.append(TreeRun(wall, wall if reaped == n else None, n - reaped, 0))
        return out

    add("floor", "floor", "C subreaper: kill() every pid it knows, reap all", floor_tree)
    for name in b.backends:
        add(
            name,
            "ours",
            "graceful_terminate_dispatch(pid), session containment",
            b.ours(name, lambda: _tree_loop(b, reps, b.spawn, _ours_stop(5000.0, "sigterm"))),
        )
    if b.keeper:

        def keeper_stop(d: DispatchResult) -> None:
            assert d.pid is not None
            _ours_stop(5000.0, "sigterm")(d.pid)

        add(
            "native+keeper",
            "ours",
            "spawn_dispatch + graceful_terminate_dispatch, keeper",
            b.ours(
                "native", lambda: _tree_loop(b, reps, lambda a: _keeper_spawn(b, a), keeper_stop)
            ),
        )
    add(
        "seed-poll",
        "baseline",
        "process-group SIGTERM, poll the leader",
        lambda: _tree_loop(b, reps, b.spawn, bl.seed_graceful_terminate_dispatch),
    )
    add(
        "stdlib Popen",
        "baseline",
        "killpg(SIGTERM), Popen.wait(timeout)",
        lambda: _tree_loop(b, reps, _popen_tree, lambda proc: bl.popen_stop_group(proc, 5.0)),
    )
    if bl.psutil is not None:
        add(
            "psutil",
            "baseline",
            "children(recursive), terminate, wait_procs",
            lambda: _tree_loop(b, reps, b.spawn, lambda pid: bl.psutil_stop_tree(pid, 5.0)),
        )
    table = Table(
        "S5",
        f"S5: stop a tree of {n} processes, detached ones included",
        f"The leader (new session) builds a tree of {n} (branching 4): every 10th node is a "
        "daemon detached by double fork + setsid (with its own subtree), every 10th another "
        "moves to its own process group; all die on SIGTERM. Stop = duration of the stop "
        "call; then /proc is checked for every recorded member (pid + start time): survivors "
        "are live members, zombies are exited members nobody reaped yet (this process is a "
        "subreaper, so orphans come to it). Time to zero = stop duration when nothing "
        "survived its return, else when /proc first showed none (checked for "
        f"{p.s5_settle_s:g} s).",
        [
            "contestant",
            "how",
            "runs",
            "stop p50",
            "time to zero (p50)",
            "max survivors",
            "max zombies",
            "zero / floor",
        ],
    )
    floor_zero = _tree_zero(entries[0].value)
    for e in entries:
        runs: Optional[list[TreeRun]] = e.value
        if not runs:
            table.rows.append([e.name, e.how, "-", "-", "-", "-", "-", "-"])
            continue
        zero = _tree_zero(runs)
        surv = max(r.survivors for r in runs)
        zomb = max(r.zombies for r in runs)
        zero_text = fmt_ns(zero) if zero is not None else f"never (within {p.s5_settle_s:g} s)"
        table.rows.append(
            [
                e.name,
                e.how,
                str(len(runs)),
                fmt_ns(statistics.median(r.stop_ns for r in runs)),
                zero_text,
                str(surv),
                str(zomb),
                fmt_ratio(zero, floor_zero),
            ]
        )
        if e.kind == "ours":
            met = zero is not None and zero < 100e6 and surv == 0
            table.targets.append(
                Target(
                    f"S5 {e.name}: time to zero survivors",
                    "< 100 ms, zero survivors",
                    f"{zero_text}, {surv} survivor(s)",
                    met,
                )
            )
    _ratio_matrix(table, entries, _tree_zero, "time to zero survivors")
    return table


def _tree_zero(runs: Optional[Sequence[TreeRun]]) -> Optional[float]:
    """Median time to zero survivors, or None if any run never got there."""
    if not runs or any(r.zero_ns is None for r in runs):
        return None
    return float(statistics.median(r.zero_ns or 0 for r in runs))


# --- S6: spawn cost, memory per watched dispatch ---------------------------------------


def _time_spawns(reps: int, spawn: Callable[[], Any], finish: Callable[[Any], Any]) -> list[int]:
    times = []
    for _ in range(reps):
        t0 = time.monotonic_ns()
        handle = spawn()
        times.append(time.monotonic_ns() - t0)
        finish(handle)
    return times


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Mem:
    n: int
    traced: float  # tracemalloc: Python heap retained per watched process
    rss: float
    fds: float


def _measure_mem(n: int, make: Callable[[], Any]) -> tuple[Mem, Any]:
    gc.collect()
    tracemalloc.start()
    try:
        rss0, fd0 = _rss_bytes(), _fd_count()
        m0 = tracemalloc.get_traced_memory()[0]
        kept = make()
        gc.collect()
        m1 = tracemalloc.get_traced_memory()[0]
        rss1, fd1 = _rss_bytes(), _fd_count()
    finally:
        tracemalloc.stop()
    return Mem(n, (m1 - m0) / n, (rss1 - rss0) / n, (fd1 - fd0) / n), kept


def _mem_ours(b: Bench, n: int) -> Mem:
    monitor_cls = load_monitor()
    if monitor_cls is None:
        raise LookupError("no DispatchMonitor in this build")
    blocked = Blocked(b, n, _posix_blocked(b))
    try:
        monitor = monitor_cls()
        try:
            dispatches = [dispatch_result(pid) for pid in blocked.handles]  # the caller's
            mem, futures = _measure_mem(n, lambda: [monitor_watch(monitor, d) for d in dispatches])
            blocked.release()
            concurrent.futures.wait(futures)
        finally:
            monitor.close()
        return mem
    finally:
        blocked.close()


def _mem_popen(b: Bench, n: int) -> Mem:
    blocked = Blocked(b, 0, _popen_blocked)
    try:
        b.stamps.reset(n)
        mem, procs = _measure_mem(
            n, lambda: [_popen_blocked(b.argv(i, wait_fd=blocked.r), blocked.r) for i in range(n)]
        )
        blocked.release()
        bl.popen_wait_many(procs)
        return mem
    finally:
        blocked.close()


def _mem_psutil(b: Bench, n: int) -> Mem:
    blocked = Blocked(b, n, _posix_blocked(b))
    try:
        mem, procs = _measure_mem(n, lambda: [bl.psutil.Process(pid) for pid in blocked.handles])
        blocked.release()
        bl.psutil.wait_procs(procs)
        return mem
    finally:
        blocked.close()


def _mem_asyncio(b: Bench, n: int) -> Mem:
    import asyncio

    async def main() -> Mem:
        r, w = os.pipe()
        os.set_inheritable(r, True)
        b.stamps.reset(n)
        procs: list[Any] = []
        waits: list[Any] = []

        async def make() -> None:
            for i in range(n):
                proc = await asyncio.create_subprocess_exec(*b.argv(i, wait_fd=r), pass_fds=(r,))
                procs.append(proc)
                waits.append(asyncio.ensure_future(proc.wait()))

        try:
            gc.collect()
            tracemalloc.start()
            try:
                rss0, fd0 = _rss_bytes(), _fd_count()
                m0 = tracemalloc.get_traced_memory()[0]
                await make()
                await asyncio.sleep(0)
                gc.collect()
                m1 = tracemalloc.get_traced_memory()[0]
                rss1, fd1 = _rss_bytes(), _fd_count()
            finally:
                tracemalloc.stop()
            os.close(w)
            w = -1
            await asyncio.gather(*waits)
            return Mem(n, (m1 - m0) / n, (rss1 - rss0) / n, (fd1 - fd0) / n)
        finally:
            if w >= 0:
                os.close(w)
            os.close(r)
            for proc in procs:
                if proc.returncode is None:
                    await proc.wait()

    return bl.asyncio_run(main())


def s6_spawn_memory(b: Bench) -> Table:
    p = b.params
    reps, n = p.s6_reps, p.s6_mem_n
    child = b.argv(stamped=False, wait_fd=0)  # blocks on its stdin until EOF
    spawn_entries: list[Entry] = []

    def add_spawn(name: str, kind: str, how: str, fn: Callable[[], Any]) -> None:
        spawn_entries.append(Entry(name, kind, how, b.attempt(f"S6 spawn {name}", fn)))

    def popen_spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(child, stdin=subprocess.PIPE, start_new_session=True)

    def popen_finish(proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()

    add_spawn(
        "subprocess.Popen",
        "baseline",
        "Popen(stdin=PIPE, start_new_session=True)",
        lambda: _time_spawns(reps, popen_spawn, popen_finish),
    )

    def posix_spawn_run() -> list[int]:
        def spawn() -> tuple[int, int]:
            r, w = os.pipe()
            try:
                actions = [(os.POSIX_SPAWN_DUP2, r, 0)]
                pid = os.posix_spawn(child[0], child, os.environ, file_actions=actions, setsid=True)
            finally:
                os.close(r)
            return pid, w

        def finish(handle: tuple[int, int]) -> None:
            os.close(handle[1])
            os.waitpid(handle[0], 0)

        return _time_spawns(reps, spawn, finish)

    add_spawn("os.posix_spawn", "baseline", "posix_spawn, stdin pipe, setsid", posix_spawn_run)
    if b.spawn_dispatch is None:
        spawn_entries.append(Entry("spawn_dispatch", "ours", "not in this build: skipped"))
    else:
        for name in b.backends:
            containment = "keeper" if name == "native" and b.keeper else "session"

            def finish(d: DispatchResult) -> None:
                assert d.pid is not None
                graceful_terminate_dispatch(d.pid)  # EOF first: closes its stdin

            add_spawn(
                f"spawn_dispatch ({name})",
                "ours",
                f"stdin='pipe', {containment} containment",
                b.ours(
                    name,
                    lambda: _time_spawns(reps, lambda: _keeper_spawn(b, child, "pipe"), finish),
                ),
            )
    popen_cls = load_popen()
    if popen_cls is None:
        spawn_entries.append(Entry("ralph_reaper.Popen", "ours", "not in this build: skipped"))
    else:
        for name in b.backends:
            containment = "keeper" if name == "native" and b.keeper else "session"

            def rr_popen_spawn() -> Any:
                return popen_cls(child, stdin=subprocess.PIPE, start_new_session=True)

            add_spawn(
                f"ralph_reaper.Popen ({name})",
                "ours",
                f"same arguments as Popen, {containment} containment",
                b.ours(name, lambda: _time_spawns(reps, rr_popen_spawn, popen_finish)),
            )
    mem_entries: list[Entry] = []

    def add_mem(name: str, kind: str, how: str, fn: Callable[[], Any]) -> None:
        mem_entries.append(Entry(name, kind, how, b.attempt(f"S6 memory {name}", fn)))

    if load_monitor() is None:
        mem_entries.append(Entry("ours", "ours", "no DispatchMonitor in this build: not measured"))
    else:
        for name in b.backends:
            add_mem(
                name,
                "ours",
                "DispatchMonitor.watch + its Future",
                b.ours(name, lambda: _mem_ours(b, n)),
            )
    add_mem(
        "reference",
        "reference",
        "a bare concurrent.futures.Future",
        lambda: _measure_mem(n, lambda: [concurrent.futures.Future() for _ in range(n)])[0],
    )
    add_mem("stdlib Popen", "baseline", "a Popen object", lambda: _mem_popen(b, n))
    add_mem(
        "stdlib asyncio",
        "baseline",
        "an asyncio Process + pending wait()",
        lambda: _mem_asyncio(b, n),
    )
    if bl.psutil is not None:
        add_mem("psutil", "baseline", "a psutil.Process", lambda: _mem_psutil(b, n))

    table = Table(
        "S6",
        "S6: spawn cost, and host memory per watched dispatch",
        f"Spawn: time of the call that starts one child (stamp blocked on its stdin), {reps} "
        "runs each, one child alive at a time (each is ended and reaped outside the timing). "
        f"Memory: {n} blocked children watched at once; Python heap retained per dispatch "
        "(tracemalloc, which sees every thread's Python allocations but not C malloc or kernel "
        "objects), RSS delta and fds per dispatch.",
        ["part", "contestant", "how", "p50", "p99", "p50 / Popen"],
    )
    popen = _stats(spawn_entries[0].value)
    for e in spawn_entries:
        st = _stats(e.value)
        if st is None:
            table.rows.append(["spawn", e.name, e.how, "-", "-", "-"])
            continue
        ratio = fmt_ratio(st[0], popen and popen[0])
        table.rows.append(["spawn", e.name, e.how, fmt_ns(st[0]), fmt_ns(st[1]), ratio])
        if e.kind == "ours":
            table.targets.append(
                Target(
                    f"S6 {e.name} vs Popen",
                    "<= 2x",
                    ratio,
                    None if popen is None else st[0] <= 2 * popen[0],
                )
            )
    table.ratio_title = f"host memory per watched process ({n} watched at once)"
    table.ratio_header = ["contestant", "how", "Python heap", "RSS delta", "fds"]
    bare = next((e.value for e in mem_entries if e.kind == "reference" and e.value), None)
    future_bytes = fmt_bytes(bare and bare.traced)
    for e in mem_entries:
        m: Optional[Mem] = e.value
        if m is None:
            table.ratio_rows.append([e.name, e.how, "-", "-", "-"])
            continue
        table.ratio_rows.append(
            [e.name, e.how, fmt_bytes(m.traced), fmt_bytes(m.rss), f"{m.fds:.2f}"]
        )
        if e.kind == "ours":
            table.targets.append(
                Target(
                    f"S6 {e.name}: host memory per watched dispatch",
                    "<= 2 KB",
                    f"{fmt_bytes(m.traced)} heap (the Future alone: {future_bytes}), "
                    f"{fmt_bytes(m.rss)} RSS",
                    m.traced <= 2048,
                )
            )
    if load_monitor() is None:
        table.targets.append(
            Target(
                "S6 ours: host memory per watched dispatch", "<= 2 KB", "no DispatchMonitor", None
            )
        )
    return table


# --- S7: a busy host --------------------------------------------------------------------


class Crowd:
    """``n`` idle processes (benchmarks/crowd.c), for a busy host: in a tree of their
    own, or with ``orphans`` the children of this process (a subreaper), which is an
    ancestor of every dispatch the benchmark starts."""

    def __init__(self, exe: str, n: int, orphans: bool = False) -> None:
        self.n = n
        argv = [exe, "-o", str(n)] if orphans else [exe, str(n)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.split() != [b"ready", str(n).encode()]:
            self.close()
            raise RuntimeError(f"crowd of {n} never became ready (it said {line!r})")

    def close(self) -> None:
        """End the crowd (killing the crowd process ends its children; orphans end
        on EOF) and reap its processes, which have come back here (a subreaper)."""
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.stdout.close()
        reaped, deadline = 0, time.monotonic() + 60
        while reaped < self.n and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.002)
            else:
                reaped += 1


def _psutil_wait_pid(pid: int) -> None:
    bl.psutil_wait(pid)


def s7_busy_host(b: Bench) -> Table:
    p = b.params
    sizes = p.s7_sizes
    table = Table(
        "S7",
        "S7: wait and stop on a busy host",
        f"The S1 wait ({p.s7_wait_reps} runs: exit-to-return) and the S4 cooperative stop "
        f"({p.s7_stop_reps} runs: exit-to-return of the stop call) of one child in a new "
        "session, with 0 to "
        f"{max(sizes)} unrelated idle processes on the host (benchmarks/crowd.c: children "
        "of a process of their own, started before the runs of each size). Ours includes "
        "the search for the session's other processes (the sweep after the exit, discovery "
        "before the signal); psutil's stop is its tree recipe (children(recursive=True)).",
        [
            "part",
            "contestant",
            "how",
            *(f"p50 at {n}" for n in sizes),
            f"{sizes[-1]} / 0",
            f"p50 at {sizes[-1]} children of an ancestor",
            "that / 0",
        ],
    )
    table.notes.append(
        "The last two columns are the worst case for ours: the unrelated processes "
        "are children of an ancestor of every dispatch (orphans of a crowd process, "
        "come back to the benchmark, a subreaper), so each search reads that "
        "ancestor's children list whole and looks up each child's cached start time. "
        "On a real host that is init or a subreaper with many children of its own."
    )
    if not b.crowd:
        table.notes.append("no crowd helper was built: S7 not run")
        return table
    kill_wait = 5000.0
    contestants: list[tuple[str, str, str, str, Callable[[], list[int]]]] = []
    for name in b.backends:
        contestants.append(
            (
                "wait",
                name,
                "ours",
                "wait_for_dispatch_completion(pid)",
                b.ours(
                    name,
                    lambda: _s1_loop(b, p.s7_wait_reps, p.s1_jitter_ms, b.spawn, _ours_wait),
                ),
            )
        )
    contestants.append(
        (
            "wait",
            "stdlib asyncio",
            "baseline",
            "create_subprocess_exec + wait()",
            lambda: _asyncio_s1(b, p.s7_wait_reps),
        )
    )
    if bl.psutil is not None:
        contestants.append(
            (
                "wait",
                "psutil",
                "baseline",
                "psutil.Process(pid).wait()",
                lambda: _s1_loop(b, p.s7_wait_reps, p.s1_jitter_ms, b.spawn, _psutil_wait_pid),
            )
        )
    for name in b.backends:
        contestants.append(
            (
                "stop",
                name,
                "ours",
                "graceful_terminate_dispatch(pid)",
                b.ours(
                    name,
                    lambda: _s4_loop(
                        b, p.s7_stop_reps, "t", b.spawn, _ours_stop(kill_wait, "sigterm")
                    ),
                ),
            )
        )
    contestants.append(
        (
            "stop",
            "stdlib asyncio",
            "baseline",
            "terminate, wait_for(wait()), kill",
            lambda: _asyncio_s4(b, p.s7_stop_reps, "t", kill_wait / 1000.0),
        )
    )
    if bl.psutil is not None:
        contestants.append(
            (
                "stop",
                "psutil",
                "baseline",
                "tree recipe: children(recursive=True), terminate, wait_procs",
                lambda: _s4_loop(
                    b,
                    p.s7_stop_reps,
                    "t",
                    b.spawn,
                    lambda pid: bl.psutil_stop_tree(pid, kill_wait / 1000.0),
                ),
            )
        )
    figures: dict[tuple[str, str], dict[tuple[int, bool], Optional[float]]] = {}
    runs = [(n, False) for n in sizes] + [(sizes[-1], True)]
    for n, orphans in runs:

        def run_size(n: int = n, orphans: bool = orphans) -> None:
            crowd = Crowd(b.crowd, n, orphans) if n else None
            try:
                for part, name, _kind, _how, fn in contestants:
                    label = f"S7 {part} {name} at {n}{' orphans' if orphans else ''}"
                    b.log(f"  {label} ...")
                    try:
                        lats = fn()
                    except Exception as exc:
                        b.errors.append(f"{label}: {type(exc).__name__}: {exc}")
                        b.log(traceback.format_exc())
                        lats = []
                    figures.setdefault((part, name), {})[(n, orphans)] = _p(lats, 50)
            finally:
                if crowd is not None:
                    crowd.close()

        what = "children of this process" if orphans else "unrelated processes"
        b.attempt(f"S7 with {n} {what}", run_size)
    for part, name, kind, how, _fn in contestants:
        row = figures.get((part, name), {})
        none, most = row.get((sizes[0], False)), row.get((sizes[-1], False))
        worst = row.get((sizes[-1], True))
        ratio = fmt_ratio(most, none)
        table.rows.append(
            [
                part,
                name,
                how,
                *(fmt_ns(row.get((n, False))) for n in sizes),
                ratio,
                fmt_ns(worst),
                fmt_ratio(worst, none),
            ]
        )
        if kind == "ours":
            table.targets.append(
                Target(
                    f"S7 {part} {name}: p50 at {sizes[-1]} unrelated processes vs none",
                    "<= 1.5x",
                    ratio,
                    None if none is None or most is None else most <= 1.5 * none,
                )
            )
    return table


# --- S8: simultaneous timeouts -----------------------------------------------------------


@dataclass
class Storm:
    stopped_ns: list[int]  # each timed-out dispatch: its result's time - the deadline
    methods: dict[str, int]  # termination_method -> how many
    others_ns: list[int]  # other dispatches meanwhile: result's time - exit stamp


def _s8_storm(b: Bench, n: int, max_others: int) -> Storm:
    """``n`` dispatches whose timeouts fall at one instant (they exit on SIGTERM), in one
    DispatchMonitor; meanwhile other dispatches, one after the other, exit on their own."""
    monitor_cls = load_monitor()
    if monitor_cls is None:
        raise RuntimeError("no DispatchMonitor in this build")
    b.stamps.reset(n + max_others)
    pids = [b.spawn(b.argv(i, mode="t")) for i in range(n)]
    b.wait_ready(n)
    stopped = [0] * n
    others: list[int] = []
    monitor = monitor_cls()
    try:
        # Room to watch them all before the deadline falls.
        deadline = time.monotonic() + 1.0 + n * 0.0005
        futures = []
        for i, pid in enumerate(pids):
            left_ms = max(1.0, (deadline - time.monotonic()) * 1000.0)
            fut = monitor.watch(dispatch_result(pid), TICKET, timeout_ms=left_ms, eof_wait_ms=0)
            fut.add_done_callback(lambda _f, i=i: stopped.__setitem__(i, time.monotonic_ns()))
            futures.append(fut)
        deadline_ns = int(deadline * 1e9)
        while time.monotonic() < deadline - 0.02:
            time.sleep(0.005)
        slot = n
        while slot < n + max_others and (
            not all(f.done() for f in futures) or slot < n + min(20, max_others)
        ):
            done_at = [0]
            pid = b.spawn(b.argv(slot, delay_us=2000))
            fut = monitor_watch(monitor, dispatch_result(pid))
            fut.add_done_callback(lambda _f, d=done_at: d.__setitem__(0, time.monotonic_ns()))
            _check_completed(fut.result(timeout=120), "other dispatch")
            while done_at[0] == 0:  # set by the monitor thread, just after the result
                time.sleep(0.0001)
            others.append(done_at[0] - b.stamps.exit_ns(slot))
            slot += 1
        concurrent.futures.wait(futures, timeout=600)
    finally:
        monitor.close()
    methods: dict[str, int] = {}
    for fut in futures:
        result = fut.result(timeout=0)
        if result.status is not DispatchCompletionStatus.TIMEOUT:
            raise RuntimeError(f"a timed-out dispatch said {result.status.value}")
        key = str(result.termination_method)
        methods[key] = methods.get(key, 0) + 1
    return Storm([t - deadline_ns for t in stopped], methods, others)


def _storm_in_host(b: Bench, backend: str, n: int, others: int) -> Storm:
    """The storm in a fresh child Python that is no subreaper (see benchmarks/storm.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.storm", b.stamp, backend, str(n), str(others)],
        capture_output=True,
        env=env,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the storm's host failed: {done.stderr.decode()[-2000:]}")
    return Storm(**json.loads(done.stdout.decode().splitlines()[-1]))


def s8_timeouts(b: Bench) -> Table:
    p = b.params
    n = p.s8_n
    table = Table(
        "S8",
        f"S8: {n} dispatches whose timeouts fall at once, in one DispatchMonitor",
        f"{n} children in sessions of their own, each exiting on SIGTERM, watched with "
        "timeouts that end at one instant (eof_wait_ms=0). Stopped: each result's time "
        "(its future's done callback) minus that instant. Meanwhile other dispatches are "
        "watched one after the other (each exits 2 ms after its start, stamping), until "
        f"the storm is over (at least 20, at most {p.s8_others}): their result's time "
        "minus their exit stamp. The host is a fresh child Python that is no subreaper, "
        "as design section 5 has the host (benchmarks/storm.py); the row 'host a "
        "subreaper' runs in the benchmark itself, which is one: there a search cannot "
        "leave out the others' trees, so the monitor takes every due stop in one walk "
        "(see ralph_reaper.monitor).",
        [
            "contestant",
            "all stopped after",
            "stopped p50",
            "methods",
            "others: n",
            "others p50",
            "others p99",
            "others max",
        ],
    )
    runs: list[tuple[str, Callable[[], Storm]]] = [
        (name, lambda name=name: _storm_in_host(b, name, n, p.s8_others)) for name in b.backends
    ]
    if "native" in b.backends:
        runs.append(
            ("native, host a subreaper", b.ours("native", lambda: _s8_storm(b, n, p.s8_others)))
        )
    for name, run in runs:
        storm: Optional[Storm] = b.attempt(f"S8 {name}", run)
        if storm is None:
            table.rows.append([name, "-", "-", "-", "-", "-", "-", "-"])
            continue
        last = max(storm.stopped_ns)
        methods = ", ".join(f"{k} {v}" for k, v in sorted(storm.methods.items()))
        o99 = percentile(storm.others_ns, 99)
        table.rows.append(
            [
                name,
                fmt_ns(last),
                fmt_ns(_p(storm.stopped_ns, 50)),
                methods,
                str(len(storm.others_ns)),
                fmt_ns(_p(storm.others_ns, 50)),
                fmt_ns(o99),
                fmt_ns(max(storm.others_ns)),
            ]
        )
        table.targets.append(
            Target(
                f"S8 {name}: all {n} stopped after the deadline",
                "<= 2 s",
                fmt_ns(last),
                last <= 2e9,
            )
        )
        table.targets.append(
            Target(
                f"S8 {name}: other exits reported meanwhile (p99)",
                "<= 10 ms",
                fmt_ns(o99),
                o99 <= 10e6,
            )
        )
    return table


SCENARIOS: list[tuple[str, Callable[[Bench], Table]]] = [
    ("S1", s1_latency),
    ("S2", s2_burst),
    ("S3", s3_idle),
    ("S4", s4_stop),
    ("S5", s5_tree),
    ("S6", s6_spawn_memory),
    ("S7", s7_busy_host),
    ("S8", s8_timeouts),
]

__all__ = ["SCENARIOS", "Bench", "Params", "Table", "Target", "sweep"]
