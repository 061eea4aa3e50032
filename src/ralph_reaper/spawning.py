"""Starting dispatches under full containment.

With the native build a dispatch runs under its own keeper (a small C
supervisor that is a child subreaper), so every process of its tree, however
it detached, is reparented to the keeper and stopped with it. Without the
keeper the dispatch is started in a new session and contained by session.
Either way the package keeps the dispatch's stdin for the EOF stage.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from typing import IO, Any, Optional, Union

from .backends import get as get_backend
from .dispatches import REGISTRY, Dispatch
from .keeper_client import KeeperLink, keeper_argv
from .keeper_path import keeper_path
from .results import DispatchResult
from .validation import check_ms

StdioTarget = Union[None, str, "os.PathLike[str]", int, IO[Any]]
STDIN_KINDS = ("pipe", "pty", "devnull", "inherit")


def _check_argv(argv: Sequence[Any]) -> list[str]:
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence):
        raise TypeError("argv must be a sequence of strings, e.g. ['pi', '-p', '/tf pt-1']")
    if not argv:
        raise ValueError("argv is empty: nothing to run")
    out = []
    for arg in argv:
        if isinstance(arg, os.PathLike):
            arg = os.fspath(arg)
        if not isinstance(arg, str):
            raise TypeError(f"argv items must be str or path-like, not {type(arg).__name__}")
        if "\0" in arg:
            raise ValueError("argv items must not contain NUL bytes")
        out.append(arg)
    return out


def _open_output(target: StdioTarget, name: str, opened: list[int]) -> Any:
    """Map a stdout/stderr choice to what Popen takes; files we open go in ``opened``."""
    if target is None or target == "inherit":
        return None
    if target == "devnull":
        return subprocess.DEVNULL
    if isinstance(target, int) and not isinstance(target, bool):
        return target
    if isinstance(target, (str, os.PathLike)):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(target, flags, 0o644)
        opened.append(fd)
        return fd
    if hasattr(target, "fileno"):
        return target
    raise TypeError(f"{name} must be None, 'inherit', 'devnull', a path, an fd or a file")


def _output_paths(*targets: StdioTarget) -> list[str]:
    return [
        os.fspath(t)
        for t in targets
        if isinstance(t, (str, os.PathLike)) and t not in ("inherit", "devnull")
    ]


def spawn_dispatch(
    argv: Sequence[Any],
    *,
    ticket_id: str,
    session_id: Optional[str] = None,
    cwd: Optional[Union[str, os.PathLike[str]]] = None,
    env: Optional[Mapping[str, str]] = None,
    stdin: str = "pipe",
    stdout: StdioTarget = None,
    stderr: StdioTarget = None,
    timeout_ms: float = 0,
    idle_timeout_ms: float = 0,
    die_with_parent: bool = True,
    exit_file: Optional[Union[str, os.PathLike[str]]] = None,
    grace_ms: float = 5000.0,
) -> DispatchResult:
    """Start ``argv`` as a dispatch under full containment and return its DispatchResult.

    A command that cannot be started gives ``status="failed"`` with the reason
    in ``error`` (as ``run_ticket_dispatch`` did); bad arguments raise
    TypeError/ValueError before anything is started. ``timeout_ms`` and
    ``idle_timeout_ms`` become the defaults of ``wait_for_dispatch_completion``
    for this dispatch.
    """
    args = _check_argv(argv)
    if not isinstance(ticket_id, str) or not ticket_id:
        raise ValueError("ticket_id must be a non-empty string")
    if stdin not in STDIN_KINDS:
        raise ValueError(f"stdin must be one of {STDIN_KINDS}, not {stdin!r}")
    timeout_ms = check_ms("timeout_ms", timeout_ms)
    idle_timeout_ms = check_ms("idle_timeout_ms", idle_timeout_ms)
    grace_ms = check_ms("grace_ms", grace_ms)
    session_id = session_id or f"{ticket_id}-{uuid.uuid4().hex[:12]}"

    def failed(error: str) -> DispatchResult:
        return DispatchResult(session_id, ticket_id, "failed", None, error)

    keeper = keeper_path() if get_backend().name == "native" else None
    own: list[int] = []  # fds to close in this process once the child has them
    held: list[int] = []  # fds this process keeps (closed on failure)
    try:
        out = _open_output(stdout, "stdout", own)
        err = _open_output(stderr, "stderr", own)
        stdin_fd: Optional[int] = None
        child_stdin: Any = None if stdin == "inherit" else subprocess.DEVNULL
        if stdin == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            own.append(r)
            held.append(w)
            child_stdin, stdin_fd = r, w
        elif stdin == "pty":
            master, slave = os.openpty()
            os.set_inheritable(master, False)
            own.append(slave)
            held.append(master)
            child_stdin, stdin_fd = slave, master
        report_fd = control_fd = None
        pass_fds: tuple[int, ...] = ()
        if keeper is not None:
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
            control_r, control_w = os.pipe2(os.O_CLOEXEC)
            held += [report_r, control_w]
            own += [report_w, control_r]
            report_fd, control_fd = report_r, control_w
            pass_fds = (report_w, control_r)
            launch = keeper_argv(
                keeper,
                report_fd=report_w,
                control_fd=control_r,
                grace_ms=grace_ms,
                parent_pid=os.getpid() if die_with_parent else None,
                exit_file=None if exit_file is None else os.fspath(exit_file),
                timeout_ms=timeout_ms,
                command=args,
            )
        else:
            launch = args
        try:
            popen = subprocess.Popen(
                launch,
                stdin=child_stdin,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                pass_fds=pass_fds,
                start_new_session=True,
            )
        except OSError as exc:
            for fd in held:
                os.close(fd)
            return failed(_launch_error(args[0] if keeper is None else keeper, exc))
    except BaseException:
        for fd in held:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    finally:
        for fd in own:
            with contextlib.suppress(OSError):
                os.close(fd)

    dispatch = Dispatch(
        pid=popen.pid,
        ticket_id=ticket_id,
        session_id=session_id,
        containment="keeper" if keeper is not None else "session",
        popen=popen,
        stdin_kind=stdin,
        stdin_fd=stdin_fd,
        keeper=None
        if report_fd is None or control_fd is None
        else KeeperLink(report_fd, control_fd),
        timeout_ms=timeout_ms,
        idle_timeout_ms=idle_timeout_ms,
        output_paths=_output_paths(stdout, stderr),
    )
    if dispatch.keeper is not None:
        problem = dispatch.keeper.await_start(
            popen.wait, lambda code: _launch_error(args[0], OSError(code, os.strerror(code)))
        )
        if problem is not None:
            popen.wait()
            dispatch.close()
            return failed(problem)
    REGISTRY.add(dispatch)
    return DispatchResult(session_id, ticket_id, "launched", popen.pid, None)


def _launch_error(program: str, exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"command not found: {program}"
    if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EPERM):
        return f"cannot execute {program}: {exc.strerror}"
    return f"cannot start {program}: {exc.strerror or exc}"
