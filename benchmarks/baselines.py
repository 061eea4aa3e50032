"""What ralph-reaper is compared with: the module it replaces, the standard library, psutil.

Each baseline is written the way a careful user of that tool would write it,
with the tool's own best mechanism; none is slowed down on purpose.

``seed-poll``
    The algorithm of the seed note (``tf/ralph_completion.py``), as that note
    and design section 1 describe it: ``poll_dispatch_status`` is one
    ``os.waitpid(pid, WNOHANG)``; ``wait_for_dispatch_completion`` polls, then
    sleeps ``poll_interval_ms`` (1000 by default; 100 is also measured);
    ``graceful_terminate_dispatch`` sends SIGTERM, sleep-polls every 100 ms up
    to ``kill_wait_ms``, sends SIGKILL and sleep-polls every 50 ms up to 2 s.
    One thing is deliberately *better* than the seed: its group kill called
    ``os.killpg(-pid, ...)``, which fails with EINVAL so that only the leader
    was signalled; here the group is signalled as intended (``killpg(pid)``
    when the leader leads its group), so tree results are not worsened by that
    bug. Many dispatches are waited the way the seed's loop would: one
    ``wait_for_dispatch_completion`` after the other (a burst) or rounds of
    ``poll_dispatch_status`` over all of them every interval (idle watching).
``stdlib``
    ``subprocess.Popen.wait(timeout)`` in a loop (the way to wait with a
    deadline; on CPython < 3.15 that is a sleep loop of 0.5 ms doubling to
    50 ms), ``Popen.terminate``/``kill``; and asyncio's
    ``create_subprocess_exec`` + ``Process.wait``, with the pidfd child watcher
    (the default from 3.12 on; installed explicitly on older Pythons, whose
    default starts one thread per child).
``psutil`` (optional)
    ``Process.wait`` (psutil >= 6 waits on a pidfd with ``poll``),
    ``psutil.wait_procs`` for many processes, and for trees the documented
    recipe: ``children(recursive=True)``, ``terminate`` each, ``wait_procs``,
    ``kill`` the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Sequence
from typing import Any, Optional, TypeVar

T = TypeVar("T")

try:  # optional
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

SEED_TERM_POLL_S = 0.1
SEED_KILL_POLL_S = 0.05
SEED_KILL_WAIT_S = 2.0
SEED_PROGRESS_S = 30.0


def psutil_version() -> Optional[str]:
    return None if psutil is None else str(psutil.__version__)


# --- seed-poll -------------------------------------------------------------------------


def seed_poll_dispatch_status(pid: int) -> tuple[bool, Optional[int]]:
    """The seed's poll: one ``waitpid(WNOHANG)``; ``(running, return_code)``."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False, None
    if got == 0:
        return True, None
    return False, os.waitstatus_to_exitcode(status)


def seed_wait_for_dispatch_completion(
    pid: int, timeout_ms: float = 0, poll_interval_ms: float = 1000.0
) -> tuple[str, Optional[int]]:
    """The seed's wait: poll, sleep ``poll_interval_ms``, repeat; stop on timeout."""
    start = time.monotonic()
    next_progress = start + SEED_PROGRESS_S
    while True:
        running, code = seed_poll_dispatch_status(pid)
        if not running:
            return ("completed" if code == 0 else "error"), code
        now = time.monotonic()
        if timeout_ms > 0 and (now - start) * 1000.0 >= timeout_ms:
            ok, _method = seed_graceful_terminate_dispatch(pid)
            return ("timeout" if ok else "error"), None
        if now >= next_progress:
            next_progress += SEED_PROGRESS_S
        time.sleep(poll_interval_ms / 1000.0)


def _seed_signal(pid: int, sig: int, use_process_group: bool) -> None:
    try:
        if use_process_group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def seed_graceful_terminate_dispatch(
    pid: int, kill_wait_ms: float = 5000.0, use_process_group: bool = True
) -> tuple[bool, str]:
    """The seed's stop: SIGTERM, sleep-poll 100 ms up to kill_wait, SIGKILL, sleep-poll 50 ms."""
    running, _ = seed_poll_dispatch_status(pid)
    if not running:
        return True, "not_running"
    _seed_signal(pid, signal.SIGTERM, use_process_group)
    start = time.monotonic()
    while (time.monotonic() - start) * 1000.0 < kill_wait_ms:
        running, _ = seed_poll_dispatch_status(pid)
        if not running:
            return True, "sigterm"
        time.sleep(SEED_TERM_POLL_S)
    _seed_signal(pid, signal.SIGKILL, use_process_group)
    start = time.monotonic()
    while time.monotonic() - start < SEED_KILL_WAIT_S:
        running, _ = seed_poll_dispatch_status(pid)
        if not running:
            return True, "sigkill"
        time.sleep(SEED_KILL_POLL_S)
    return False, "failed"


def seed_wait_many(pids: Sequence[int], poll_interval_ms: float) -> None:
    """Many dispatches with the seed's API: one wait after the other."""
    for pid in pids:
        seed_wait_for_dispatch_completion(pid, poll_interval_ms=poll_interval_ms)


def seed_poll_rounds(pids: Sequence[int], poll_interval_ms: float, until: float) -> list[int]:
    """Watch many dispatches until ``until`` (monotonic): a poll round every interval.

    Returns the pids still running.
    """
    live = list(pids)
    while live:
        live = [pid for pid in live if seed_poll_dispatch_status(pid)[0]]
        left = until - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(poll_interval_ms / 1000.0, left))
    return live


# --- stdlib: subprocess ----------------------------------------------------------------


def popen_wait_loop(proc: subprocess.Popen[bytes], timeout_s: float = 1.0) -> int:
    """``Popen.wait(timeout)`` in a loop (what a supervisor with deadlines writes)."""
    while True:
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue


def popen_wait_many(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        popen_wait_loop(proc)


def popen_poll_rounds(
    procs: Sequence[subprocess.Popen[bytes]], interval_s: float, until: float
) -> None:
    """Watch many Popen objects: a ``poll()`` round every ``interval_s`` until ``until``."""
    live = list(procs)
    while live:
        live = [p for p in live if p.poll() is None]
        left = until - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(interval_s, left))


def popen_stop(proc: subprocess.Popen[bytes], kill_wait_s: float) -> str:
    """``terminate``, ``wait(timeout)``, then ``kill`` and ``wait``: the leader only."""
    proc.terminate()
    try:
        proc.wait(timeout=kill_wait_s)
        return "sigterm"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=SEED_KILL_WAIT_S)
        return "sigkill"


def popen_stop_group(proc: subprocess.Popen[bytes], kill_wait_s: float) -> str:
    """The stdlib way to stop a tree started with ``start_new_session``: its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=kill_wait_s)
        return "sigterm"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=SEED_KILL_WAIT_S)
        return "sigkill"


# --- stdlib: asyncio -------------------------------------------------------------------


def asyncio_run(main: Awaitable[T]) -> T:
    """``asyncio.run`` with the pidfd child watcher (the default on 3.12+)."""
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return asyncio.run(main)  # type: ignore[arg-type]
    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        watcher = asyncio.PidfdChildWatcher()
        policy.set_child_watcher(watcher)  # type: ignore[attr-defined]
    try:
        return asyncio.run(main)  # type: ignore[arg-type]
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            policy.set_child_watcher(None)  # type: ignore[attr-defined]


async def asyncio_stop(proc: asyncio.subprocess.Process, kill_wait_s: float) -> str:
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), kill_wait_s)
        return "sigterm"
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return "sigkill"


# --- psutil ----------------------------------------------------------------------------


def psutil_wait(pid: int) -> Optional[int]:
    assert psutil is not None
    code: Optional[int] = psutil.Process(pid).wait()
    return code


def psutil_stop(proc: Any, kill_wait_s: float) -> str:
    assert psutil is not None
    proc.terminate()
    try:
        proc.wait(timeout=kill_wait_s)
        return "sigterm"
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=SEED_KILL_WAIT_S)
        return "sigkill"


def psutil_stop_tree(pid: int, kill_wait_s: float) -> str:
    """psutil's documented recipe for killing a process tree."""
    assert psutil is not None
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return "not_running"
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=kill_wait_s)
    if not alive:
        return "sigterm"
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=SEED_KILL_WAIT_S)
    return "sigkill"
