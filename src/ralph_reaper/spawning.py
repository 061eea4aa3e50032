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
from .plan import DEFAULT_EOF_WAIT_MS
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
        try:
            fd = os.open(target, flags, 0o644)
        except OSError as exc:
            raise _OutputError(f"cannot open {name} {os.fspath(target)!r}: {exc.strerror}") from exc
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
    for this dispatch (and of the monitor and asyncio faces): a face waiting at
    the timeout stops it as it stops any dispatch, EOF first. Under a keeper
    the timeout also holds when nobody waits: the keeper's own timer falls
    that much later, plus the default EOF wait when the package holds the
    dispatch's stdin, so that it never cuts short the EOF stage of a face.
    """
    args = _check_argv(argv)
    timeout_ms, idle_timeout_ms, grace_ms = _check_options(
        ticket_id, stdin, timeout_ms=timeout_ms, idle_timeout_ms=idle_timeout_ms, grace_ms=grace_ms
    )
    session_id = session_id or f"{ticket_id}-{uuid.uuid4().hex[:12]}"

    def failed(error: str) -> DispatchResult:
        return DispatchResult(session_id, ticket_id, "failed", None, error)

    keeper = keeper_path() if get_backend().name == "native" else None
    fds = _Fds()
    try:
        out = _open_output(stdout, "stdout", fds.own)
        err = _open_output(stderr, "stderr", fds.own)
        child_stdin, stdin_fd = _stdin_ends(stdin, fds)
        link: Optional[KeeperLink] = None
        launch: list[str] = args
        pass_fds: tuple[int, ...] = ()
        if keeper is not None:
            link, launch, pass_fds = _keeper_launch(
                keeper,
                fds,
                grace_ms=grace_ms,
                parent_pid=os.getpid() if die_with_parent else None,
                exit_file=None if exit_file is None else os.fspath(exit_file),
                # A waiting face begins its stop with EOF at the timeout; the
                # keeper's own timer (for when nobody waits) leaves room for it.
                timeout_ms=timeout_ms + (DEFAULT_EOF_WAIT_MS if stdin_fd is not None else 0)
                if timeout_ms > 0
                else 0,
                command=args,
            )
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
    except _OutputError as exc:
        fds.close_held()
        return failed(str(exc))
    except OSError as exc:
        fds.close_held()
        return failed(_launch_error(args[0] if keeper is None else keeper, exc))
    except BaseException:
        fds.close_held()
        raise
    finally:
        fds.close_own()
    dispatch = Dispatch(
        pid=popen.pid,
        ticket_id=ticket_id,
        session_id=session_id,
        containment="keeper" if keeper is not None else "session",
        popen=popen,
        stdin_kind=stdin,
        stdin_fd=stdin_fd,
        keeper=link,
        timeout_ms=timeout_ms,
        idle_timeout_ms=idle_timeout_ms,
        output_paths=_output_paths(stdout, stderr),
    )
    problem = _await_keeper(dispatch, args[0])
    if problem is not None:
        return failed(problem)
    REGISTRY.add(dispatch)
    return DispatchResult(session_id, ticket_id, "launched", popen.pid, None)


def _await_keeper(dispatch: Dispatch, program: str) -> Optional[str]:
    """Under a keeper: None once it says the command runs, else why it does not."""
    link = dispatch.keeper
    if link is None:
        return None
    problem = link.await_start(
        dispatch.popen.wait,
        lambda code: _launch_error(program, OSError(code, os.strerror(code))),
    )
    if problem is not None:
        dispatch.popen.wait()
        dispatch.close()
    return problem


def _check_options(ticket_id: object, stdin: object, **durations: float) -> list[float]:
    if not isinstance(ticket_id, str) or not ticket_id:
        raise ValueError("ticket_id must be a non-empty string")
    if stdin not in STDIN_KINDS:
        raise ValueError(f"stdin must be one of {STDIN_KINDS}, not {stdin!r}")
    return [check_ms(name, value) for name, value in durations.items()]


class _OutputError(Exception):
    """An output file could not be opened: a launch failure, reported as a result."""


class _Fds:
    """Fds of a launch: ``own`` are closed here once the child has them, ``held``
    are kept by this process (and closed if the launch fails)."""

    def __init__(self) -> None:
        self.own: list[int] = []
        self.held: list[int] = []

    def close_own(self) -> None:
        for fd in self.own:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close_held(self) -> None:
        for fd in self.held:
            with contextlib.suppress(OSError):
                os.close(fd)


def _stdin_ends(stdin: str, fds: _Fds) -> tuple[Any, Optional[int]]:
    """The child's stdin and the end this process keeps for the EOF stage (or None)."""
    if stdin == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        fds.own.append(r)
        fds.held.append(w)
        return r, w
    if stdin == "pty":
        master, slave = os.openpty()
        os.set_inheritable(master, False)
        fds.own.append(slave)
        fds.held.append(master)
        return slave, master
    return (None if stdin == "inherit" else subprocess.DEVNULL), None


def _keeper_launch(
    keeper: str, fds: _Fds, **options: Any
) -> tuple[KeeperLink, list[str], tuple[int, ...]]:
    """The keeper's pipes, its command line and the fds it inherits."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    fds.held.append(report_r)
    fds.own.append(report_w)
    control_r, control_w = os.pipe2(os.O_CLOEXEC)
    fds.held.append(control_w)
    fds.own.append(control_r)
    argv = keeper_argv(keeper, report_fd=report_w, control_fd=control_r, **options)
    return KeeperLink(report_r, control_w), argv, (report_w, control_r)


def _launch_error(program: str, exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"command not found: {program}"
    if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EPERM):
        return f"cannot execute {program}: {exc.strerror}"
    return f"cannot start {program}: {exc.strerror or exc}"
