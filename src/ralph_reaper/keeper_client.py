"""The host's side of the keeper's protocol, in one place.

The keeper (``csrc/keeper.c``) is started with two pipes: it writes JSON
lines to the report pipe (``started``, ``command_exit``, ``exit``) and reads
``stop <grace_ms>`` / ``kill`` lines from the control pipe. This module builds
its command line, reads and decodes its reports, asks it to stop, and folds
its final report into a stop outcome. Nothing else in the package knows the
wire format.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

from .backends.base import ExitStatus, Rusage

#: How long spawning waits for the keeper to say whether the command started.
START_WAIT_S = 10.0


#: The keeper's longest duration (about 31.7 years). Any finite duration is
#: accepted; a longer one cannot be told apart from this within a lifetime.
KEEPER_MAX_MS = 1_000_000_000_000


def keeper_ms(ms: float) -> str:
    """A duration as the keeper's command line and control pipe take it."""
    return str(min(max(int(ms), 0), KEEPER_MAX_MS))


def keeper_argv(
    keeper: str,
    *,
    report_fd: int,
    control_fd: int,
    grace_ms: float,
    parent_pid: Optional[int],
    exit_file: Optional[str],
    timeout_ms: float,
    command: Sequence[str],
    foreground: bool = False,
    quiet: bool = True,
) -> list[str]:
    """The keeper's command line (``parent_pid``: stop the tree when that process dies).

    ``foreground`` keeps the command in the keeper's session and process group (the
    terminal's); ``quiet``: an exec failure comes back in the report only, since the
    host turns it into a result of its own.
    """
    argv = [keeper, "--report-fd", str(report_fd), "--control-fd", str(control_fd)]
    argv += ["--grace-ms", keeper_ms(grace_ms)]
    if parent_pid is not None:
        argv += ["--die-with-parent", "--parent-pid", str(parent_pid)]
    if exit_file is not None:
        argv += ["--exit-file", exit_file]
    if timeout_ms > 0:  # the keeper enforces it even if nobody waits
        argv += ["--timeout-ms", keeper_ms(timeout_ms)]
    if foreground:
        argv.append("--foreground")
    if quiet:
        argv.append("--quiet")
    return [*argv, "--", *command]


class KeeperLink:
    """The two pipes to one keeper and what it has said so far."""

    def __init__(self, report_fd: int, control_fd: int) -> None:
        os.set_blocking(report_fd, False)
        self.report_fd: Optional[int] = report_fd
        self.control_fd: Optional[int] = control_fd
        #: The command's pid, from the keeper's ``started`` line.
        self.command_pid: Optional[int] = None
        #: The keeper's last line (``exit``): how the run ended, as only it saw.
        self.final_report: Optional[dict[str, Any]] = None
        #: The report pipe reached EOF: the keeper is gone.
        self.report_eof = False
        self._buffer = b""
        self._lock = threading.Lock()

    def request_stop(self, grace_ms: float, first_signal: int = int(signal.SIGTERM)) -> bool:
        """Ask the keeper to run its stop sequence, beginning with ``first_signal``
        (SIGKILL: no grace); False if it cannot be asked."""
        line = f"stop {keeper_ms(grace_ms)}"
        if first_signal != signal.SIGTERM:
            line += f" {int(first_signal)}"
        with self._lock:
            fd = self.control_fd
            if fd is None:
                return False
            try:
                os.write(fd, (line + "\n").encode())
            except OSError:
                return False
            return True

    def read_reports(self) -> None:
        """Take every complete line the keeper has written so far (never blocks)."""
        with self._lock:
            fd = self.report_fd
            if fd is None:
                return
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    break
                if not chunk:
                    self.report_eof = True
                    break
                self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                self._note(json.loads(line))

    def _note(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        kind = event.get("event")
        if kind == "started" and isinstance(event.get("pid"), int):
            self.command_pid = event["pid"]
        elif kind == "exit":
            self.final_report = event

    def await_start(
        self, exit_status: Callable[[], int], exec_error: Callable[[int], str]
    ) -> Optional[str]:
        """Wait until the command was exec'd: None, or why it was not.

        ``exit_status`` gives the keeper's exit status once it has gone away;
        ``exec_error`` words the errno of a failed exec.
        """
        deadline = time.monotonic() + START_WAIT_S
        while True:
            self.read_reports()
            if self.command_pid is not None:
                return None
            report = self.final_report
            if report is not None:
                code = int(report.get("exec_errno") or 0)
                if code:
                    return exec_error(code)
                return "the keeper exited before starting the command: " + json.dumps(report)
            if self.report_eof:
                return f"the keeper exited with status {exit_status()}"
            left = deadline - time.monotonic()
            if left <= 0 or self.report_fd is None:
                return "the keeper did not report the start of the command in time"
            select.select([self.report_fd], [], [], min(left, 0.05))

    def close(self) -> None:
        with self._lock:
            fds = [self.report_fd, self.control_fd]
            self.report_fd = self.control_fd = None
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


def command_status(report: dict[str, Any]) -> Optional[ExitStatus]:
    """The command's own exit (with core flag and rusage), from the final report.

    The keeper mirrors the command's exit with core dumps off, so the host's
    view of the keeper lacks the core flag; the report has the truth.
    """
    raw = report.get("status")
    if not isinstance(raw, int) or isinstance(raw, bool):
        return None
    return ExitStatus(
        raw,
        Rusage(
            float(report.get("utime_s") or 0.0),
            float(report.get("stime_s") or 0.0),
            int(report.get("maxrss_kb") or 0),
        ),
    )


def report_survivors(report: dict[str, Any]) -> list[int]:
    survivors = report.get("survivors")
    if not isinstance(survivors, list):
        return []
    return [p for p in survivors if isinstance(p, int) and not isinstance(p, bool)]


def report_stage_ms(report: dict[str, Any]) -> dict[str, float]:
    stages = report.get("stage_ms")
    if not isinstance(stages, dict):
        return {}
    return {str(k): float(v) for k, v in stages.items() if isinstance(v, (int, float))}


def exit_file_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot take an exit file (None when it can), asked before a launch.

    The keeper writes its exit file only at the very end; a directory that is
    missing then would lose the record of a run that already happened, so
    the launch is refused up front instead, with the reason.
    """
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        what = "does not exist" if not os.path.lexists(directory) else "is not a directory"
        return f"cannot write exit file {path!r}: directory {directory!r} {what}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot write exit file {path!r}: directory {directory!r} is not writable"
    if os.path.isdir(path):
        return f"cannot write exit file {path!r}: it is a directory"
    return None


def exit_record(
    pid: Optional[int],
    status: Optional[ExitStatus],
    *,
    exec_errno: int = 0,
    containment: str = "session",
) -> dict[str, Any]:
    """The keeper's final report, as the host writes it when no keeper ran the dispatch.

    Same keys and meanings as the keeper's exit file, so that a reader need
    not know which backend ran it; what only a keeper knows (how its stop
    sequence went) is null, and ``containment`` says who wrote it.
    """
    raw = -1 if status is None else status.status
    usage = None if status is None else status.rusage
    exited = status is not None and os.WIFEXITED(raw)
    killed = status is not None and os.WIFSIGNALED(raw)
    return {
        "event": "exit",
        "pid": pid,
        "status": None if status is None else raw,
        "exit_code": os.WEXITSTATUS(raw) if exited else None,
        "signal": status.signal if killed and status is not None else None,
        "core_dumped": bool(status is not None and status.core_dumped),
        "utime_s": None if usage is None else usage.utime_s,
        "stime_s": None if usage is None else usage.stime_s,
        "maxrss_kb": None if usage is None else usage.maxrss_kb,
        "descendants_killed": None,
        "method": None,
        "reason": "error" if exec_errno else None,
        "stage_ms": {"sigterm": None, "sigkill": None},
        "survivors": [],
        "exec_errno": exec_errno,
        "error": None,
        "errno": 0,
        "containment": containment,
    }


def write_exit_file(path: str, record: dict[str, Any]) -> None:
    """Put ``record`` at ``path`` as the keeper does: one JSON line, atomically, durably.

    The temporary file has a short name of its own (one built from the exit
    file's name could exceed NAME_MAX); a file already there keeps its owner
    and permission bits. Raises OSError (``path`` then holds the old file).
    """
    directory = os.path.dirname(path) or "."
    payload = (json.dumps(record) + "\n").encode()
    mode, owner = 0o644, None
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".rr-exit-", suffix=".tmp")
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if owner is not None and owner != (os.fstat(fd).st_uid, os.fstat(fd).st_gid):
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
