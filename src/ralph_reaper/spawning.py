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
import stat
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Optional, Union

from .backends import get as get_backend
from .backends.base import ExitStatus
from .dispatches import REGISTRY, Dispatch
from .exits import BOOK
from .keeper_client import (
    KeeperLink,
    exit_file_problem,
    exit_record,
    keeper_argv,
    write_exit_file,
)
from .keeper_path import keeper_path
from .lineage import Lineage
from .logs import resolve_logger
from .plan import DEFAULT_EOF_WAIT_MS
from .results import DispatchResult, StdinMode
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
        try:
            os.fstat(target)
        except OSError as exc:  # else the launcher's dup2 fails, in its own words
            raise _OutputError(f"cannot use {name} fd {target}: {exc.strerror}") from exc
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
    stdin: StdinMode = "pipe",
    stdout: StdioTarget = None,
    stderr: StdioTarget = None,
    timeout_ms: float = 0,
    idle_timeout_ms: float = 0,
    die_with_parent: bool = True,
    exit_file: Optional[Union[str, os.PathLike[str]]] = None,
    grace_ms: float = 5000.0,
    foreground: bool = False,
) -> DispatchResult:
    """Start ``argv`` as a dispatch under full containment and return its DispatchResult.

    A command that cannot be started gives ``status="failed"`` with the reason
    in ``error`` (as ``run_ticket_dispatch`` did), and so does a place it
    cannot start in: a ``cwd`` that is not a directory, an output that cannot
    be opened, an ``exit_file`` whose directory is missing or not writable
    (refused before anything starts: the record of the run would be lost at
    its end). Bad arguments raise TypeError/ValueError before anything is
    started. A file without ``#!`` that is not a binary cannot be executed
    (ENOEXEC), as with ``subprocess``, on every backend. ``exit_file`` gets
    the keeper's final report (one JSON line, written atomically): from the
    keeper itself under a keeper, else from this package once it has
    collected the dispatch's end (a wait, a poll or a stop), with what only
    a keeper knows left null. ``timeout_ms`` and
    ``idle_timeout_ms`` become the defaults of ``wait_for_dispatch_completion``
    for this dispatch (and of the monitor and asyncio faces): a face waiting at
    the timeout stops it as it stops any dispatch, EOF first. Under a keeper
    the timeout also holds when nobody waits: the keeper's own timer falls
    that much later, plus the default EOF wait when the package holds the
    dispatch's stdin, so that it never cuts short the EOF stage of a face.
    ``foreground`` starts it without a new session, in this process's group, so
    that it keeps the controlling terminal (the keeper still contains its tree).
    """
    args = _check_argv(argv)
    timeout_ms, idle_timeout_ms, grace_ms = _check_options(
        ticket_id, stdin, timeout_ms=timeout_ms, idle_timeout_ms=idle_timeout_ms, grace_ms=grace_ms
    )
    exit_path = _check_exit_file(exit_file)
    session_id = session_id or f"{ticket_id}-{uuid.uuid4().hex[:12]}"

    def failed(error: str) -> DispatchResult:
        return DispatchResult(session_id, ticket_id, "failed", None, error)

    problem = _place_problem(cwd, exit_path)
    if problem is not None:
        return failed(problem)
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
                exit_file=exit_path,
                # A waiting face begins its stop with EOF at the timeout; the
                # keeper's own timer (for when nobody waits) leaves room for it.
                timeout_ms=timeout_ms + (DEFAULT_EOF_WAIT_MS if stdin_fd is not None else 0)
                if timeout_ms > 0
                else 0,
                command=args,
                foreground=foreground,
            )
        popen = subprocess.Popen(
            launch,
            stdin=child_stdin,
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            pass_fds=pass_fds,
            start_new_session=not foreground,
        )
    except _OutputError as exc:
        fds.close_held()
        return failed(str(exc))
    except OSError as exc:
        fds.close_held()
        if cwd is not None and exc.filename is not None and _same_path(exc.filename, cwd):
            return failed(_cwd_error(cwd, exc.errno))
        if keeper is None and exit_path is not None and exc.errno and exc.filename is not None:
            _record_exec_failure(exit_path, exc.errno)  # the exec itself failed
        return failed(_launch_error(args[0] if keeper is None else keeper, exc))
    except BaseException:
        fds.close_held()
        raise
    finally:
        fds.close_own()
    dispatch = (Dispatch if keeper is not None or exit_path is None else _SessionDispatch)(
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
    if isinstance(dispatch, _SessionDispatch):
        dispatch.exit_path = exit_path
    backend = get_backend()
    st = backend.proc_stat(popen.pid)  # our unreaped child: readable, even as a zombie
    if st is not None:
        dispatch.starttime = st.starttime
        if keeper is None:
            dispatch.lineage = Lineage.of_child(backend, popen.pid, st.starttime)
    problem = _await_keeper(dispatch, args[0])
    if problem is not None:
        return failed(problem)
    REGISTRY.add(dispatch)
    return DispatchResult(session_id, ticket_id, "launched", popen.pid, None)


def _check_exit_file(exit_file: object) -> Optional[str]:
    if exit_file is None:
        return None
    if not isinstance(exit_file, (str, os.PathLike)):
        raise TypeError(f"exit_file must be a path, not {type(exit_file).__name__}")
    path = os.fspath(exit_file)
    if not isinstance(path, str):
        raise TypeError("exit_file must be a str path, not bytes")
    if not path or "\0" in path:
        raise ValueError(f"exit_file must be a non-empty path without NUL, not {path!r}")
    return path


def _place_problem(
    cwd: Optional[Union[str, os.PathLike[str]]], exit_path: Optional[str]
) -> Optional[str]:
    """Why the dispatch cannot start where it was asked to, before anything starts.

    Only a launcher's own failure would say so afterwards, and in its own
    terms (the keeper's "exit status 125", or a "command not found" that
    names the wrong file).
    """
    if cwd is not None:
        try:
            st = os.stat(cwd)
        except OSError as exc:
            return _cwd_error(cwd, exc.errno)
        if not stat.S_ISDIR(st.st_mode):
            return _cwd_error(cwd, errno.ENOTDIR)
    if exit_path is not None:
        return exit_file_problem(exit_path)
    return None


def _same_path(a: Any, b: Any) -> bool:
    """subprocess reports a failed chdir with the cwd as given (str or path)."""
    with contextlib.suppress(TypeError):
        return bool(os.fspath(a) == os.fspath(b))
    return False


def _cwd_error(cwd: Union[str, os.PathLike[str]], code: Optional[int]) -> str:
    reason = os.strerror(code) if code else "unusable"
    return f"cannot use cwd {os.fspath(cwd)!r}: {reason}"


def _record_exec_failure(path: str, code: int) -> None:
    """The exit file of a command that could not be exec'd, as the keeper writes it."""
    status = ExitStatus((127 if code in (errno.ENOENT, errno.ENOTDIR) else 126) << 8)
    try:
        write_exit_file(path, exit_record(None, status, exec_errno=code))
    except OSError as exc:
        resolve_logger(None).error(f"cannot write exit file {path}: {exc}")


@dataclass
class _SessionDispatch(Dispatch):
    """A dispatch without a keeper whose end goes to an exit file.

    The package writes it, in the keeper's format, when it is done with the
    dispatch (:meth:`close`, once a wait, a poll or a stop collected its
    end): without a keeper nothing else outlives the command to do it. Its
    exit is then known to the package's book of exits, which every reap of
    this process feeds, whichever face did it.
    """

    exit_path: Optional[str] = None

    def close(self) -> None:
        super().close()
        with self._lock:
            path, self.exit_path = self.exit_path, None
        if path is None:
            return
        status = BOOK.lookup(get_backend(), self.pid)
        try:
            write_exit_file(path, exit_record(self.pid, status))
        except OSError as exc:
            resolve_logger(None).error(f"cannot write exit file {path}: {exc}")


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
