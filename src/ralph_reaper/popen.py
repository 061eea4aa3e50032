"""``ralph_reaper.Popen``: :class:`subprocess.Popen`, with the command run under a keeper.

A loop that launches its dispatches with ``subprocess.Popen(...,
start_new_session=True)`` gets session containment from the drop-in
functions, and a daemon that double-forked and called ``setsid`` escapes it.
Changing that one name to ``ralph_reaper.Popen`` starts the same command,
with the same arguments, under its own keeper (a child subreaper): whatever
the command's tree does, every process of it is reparented to the keeper and
stopped with it. Everything else is still a ``subprocess.Popen``: pipes,
``communicate``, text mode, the context manager, ``TimeoutExpired``.

What the object stands for is the command, not the keeper: the keeper's exit
mirrors the command's (its code, or ``-N`` for signal N), ``send_signal``
reaches the command itself, and ``terminate``/``kill`` stop the whole tree.
``pid`` is the keeper's, the process this one started: it is the pid the
drop-in functions are given, and they recognise it (``containment ==
"keeper"``) because it is registered like a dispatch of :func:`spawn_dispatch`.

Without the native build (or with another backend active) there is no
keeper: the command runs in a new session and the tree is stopped by session
containment, the best there is then; :attr:`Popen.containment` says which.

Waits never go through ``os.waitpid`` on the pid: the package may have
reaped it already (a drop-in wait on the same pid), and a recycled pid must
never be waited for. They go through a pin (a pidfd, or pid and start time)
and the package's book of the exits it reaped.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, AnyStr, Literal, Optional, TypedDict, cast, overload

from .backends import get as get_backend
from .backends.base import Backend, ExitStatus
from .containment import Members
from .dispatches import REGISTRY, Dispatch
from .engine import dispatch_stop, drive, lost_keeper_stop, run_registered
from .exits import BOOK
from .keeper_client import KeeperLink, keeper_argv
from .keeper_path import keeper_path
from .logs import resolve_logger
from .pins import Pin
from .plan import DEFAULT_EOF_WAIT_MS
from .validation import check_ms
from .waiting import wait_any

if TYPE_CHECKING:
    from subprocess import _CMD, _ENV, _FILE

    from _typeshed import StrOrBytesPath
    from typing_extensions import Unpack

__all__ = ["Popen"]


class PopenOptions(TypedDict, total=False):
    """The keyword arguments of :class:`subprocess.Popen` other than the text-mode ones,
    and this class's own (``grace_ms``, ``eof_wait_ms``, ``die_with_parent``)."""

    bufsize: int
    executable: Optional[StrOrBytesPath]
    stdin: _FILE
    stdout: _FILE
    stderr: _FILE
    preexec_fn: Optional[Callable[[], object]]
    close_fds: bool
    shell: bool
    cwd: Optional[StrOrBytesPath]
    env: Optional[_ENV]
    startupinfo: Any
    creationflags: int
    restore_signals: bool
    start_new_session: bool
    pass_fds: Collection[int]
    user: Optional[str | int]
    group: Optional[str | int]
    extra_groups: Optional[Iterable[str | int]]
    umask: int
    pipesize: int
    process_group: Optional[int]
    grace_ms: float
    eof_wait_ms: float
    die_with_parent: bool


#: This class's own keywords, taken off before the rest goes to subprocess.Popen.
OWN_OPTIONS = ("grace_ms", "eof_wait_ms", "die_with_parent")

_POPEN_SIGNATURE = inspect.signature(subprocess.Popen.__init__)


class _PopenDispatch(Dispatch):
    """A registered dispatch whose pipes belong to a :class:`Popen`.

    The package's EOF stage closes the ``Popen``'s stdin file object (closing
    a bare fd under it would leave the object to close a number that may have
    been reused), and releasing the dispatch never touches the ``Popen``'s
    return code: the ``Popen`` learns it from the exit book.
    """

    @property
    def stdin_fd(self) -> Optional[int]:
        """The command's stdin while the ``Popen`` holds it open (the EOF stage needs it)."""
        stream = self.popen.stdin
        if stream is None or stream.closed:
            return None
        return stream.fileno()

    @stdin_fd.setter
    def stdin_fd(self, value: Optional[int]) -> None:
        """Ignored: the stdin is the ``Popen``'s, whatever the dataclass assigns."""

    def send_eof(self) -> bool:
        with self._lock:
            stream = self.popen.stdin
            if stream is None or stream.closed:
                return False
            # A command that stopped reading leaves unflushed data: EPIPE here is fine.
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        return True

    #: Set once the package released it: whoever collected the exit also did what follows.
    released = False

    def close(self) -> None:
        self.released = True
        if self.keeper is not None:
            self.keeper.read_reports()
            self.keeper.close()
        # Released because the package collected the exit: let the Popen know now.
        self.popen.poll()


def _command_argv(args: Any, executable: Any, shell: bool) -> list[str]:
    """What the keeper execs: the command as ``subprocess`` would have run it.

    The keeper takes one argv, so ``executable`` replaces ``args[0]`` (the
    program then sees its path as its name); with ``shell`` it is the shell.
    """
    if isinstance(args, (str, bytes)):
        argv: list[Any] = [args]
    elif isinstance(args, os.PathLike):
        if shell:
            raise TypeError("path-like args is not allowed when shell is true")
        argv = [args]
    else:
        argv = list(args)
    if shell:
        argv = [executable or "/bin/sh", "-c", *argv]
    elif executable is not None:
        argv = [executable, *argv[1:]]
    if not argv:
        raise IndexError("list index out of range")  # what subprocess raises for []
    return [os.fsdecode(a) for a in argv]


def _popen_init(self: Popen[Any], args: Any, *popen_args: Any, **popen_kwargs: Any) -> None:
    """``Popen.__init__``: :class:`subprocess.Popen`'s arguments, the command under a keeper."""
    for name in OWN_OPTIONS:
        if name in popen_kwargs:
            setattr(self, name, popen_kwargs.pop(name))
    if not isinstance(self.die_with_parent, bool):
        raise TypeError(f"die_with_parent must be a bool, not {self.die_with_parent!r}")
    check_ms("grace_ms", self.grace_ms)
    check_ms("eof_wait_ms", self.eof_wait_ms)
    bound = _POPEN_SIGNATURE.bind(self, args, *popen_args, **popen_kwargs)
    given = bound.arguments
    self._rr_pin = None
    self._rr_command = None
    self._rr_command_pid = None
    self._rr_dispatch = None
    self._rr_lock = threading.Lock()
    self._rr_stopper = None
    self._rr_sweeper = None
    backend = get_backend()
    self.backend = backend.name
    keeper = keeper_path() if backend.name == "native" else None
    pass_fds = tuple(given.get("pass_fds", ()))
    if keeper is None:
        self.containment = "session"
        if given.get("process_group") is None:  # a session leader cannot join another group
            given["start_new_session"] = True  # session containment needs a session of its own
        subprocess.Popen.__init__(*bound.args, **bound.kwargs)
        self._rr_pin = Pin.open(backend, self.pid)
        self._rr_register(None)
        return
    self.containment = "keeper"
    command = _command_argv(args, given.get("executable"), bool(given.get("shell", False)))
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    control_r, control_w = os.pipe2(os.O_CLOEXEC)
    link = KeeperLink(report_r, control_w)
    try:
        given["args"] = keeper_argv(
            keeper,
            report_fd=report_w,
            control_fd=control_r,
            grace_ms=check_ms("grace_ms", self.grace_ms),
            parent_pid=os.getpid() if self.die_with_parent else None,
            exit_file=None,
            timeout_ms=0,
            command=command,
        )
        given["executable"] = None
        given["shell"] = False
        given["pass_fds"] = (*pass_fds, report_w, control_r)
        subprocess.Popen.__init__(*bound.args, **bound.kwargs)
    except BaseException:
        link.close()
        raise
    finally:
        os.close(report_w)
        os.close(control_r)
    self.args = args
    self._rr_pin = Pin.open(backend, self.pid)
    failure = self._rr_await_start(link, command[0])
    if failure is not None:
        link.close()
        pin = self._rr_pin
        if pin is not None and not pin.exited():  # it never said: it stops what it started
            pin.signal(int(signal.SIGTERM))
        self._rr_settle(None)
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        raise failure
    command_pid = self._rr_command_pid = link.command_pid
    self._rr_command = None if command_pid is None else Pin.open(backend, command_pid)
    self._rr_register(link)


class Popen(subprocess.Popen[AnyStr]):
    """:class:`subprocess.Popen` running its command under a keeper; see the module docstring.

    The constructor takes the arguments of :class:`subprocess.Popen`, and three
    keywords of its own: ``grace_ms`` (between SIGTERM and SIGKILL),
    ``eof_wait_ms`` (between EOF and SIGTERM, for :meth:`terminate`) and
    ``die_with_parent``. Differences, each for containment's sake: the command
    always runs in a session of its own (the keeper's ``setsid``);
    ``executable`` replaces ``args[0]`` instead of sitting beside it; the tree
    is stopped when this process dies; ``terminate`` and ``kill`` reach the
    whole tree, and ``wait`` returns once the keeper has stopped what the
    command left behind.
    """

    #: Between SIGTERM and SIGKILL, for :meth:`terminate` and for the keeper's
    #: own stops (what the command leaves behind when it exits; SIGTERM to the keeper).
    grace_ms: float = 5000.0
    #: How long :meth:`terminate` waits after closing the command's stdin before SIGTERM.
    eof_wait_ms: float = DEFAULT_EOF_WAIT_MS
    #: Stop the tree when this process dies, even by SIGKILL (keeper only).
    die_with_parent: bool = True

    #: "keeper", or "session" without the native build.
    containment: str
    #: The backend active when the command was started.
    backend: str
    _rr_pin: Optional[Pin]
    _rr_command: Optional[Pin]
    _rr_command_pid: Optional[int]
    _rr_dispatch: Optional[_PopenDispatch]
    _rr_lock: threading.Lock
    _rr_stopper: Optional[threading.Thread]
    _rr_sweeper: Optional[threading.Thread]

    if TYPE_CHECKING:
        # subprocess.Popen's own overloads, text mode deciding str or bytes; the
        # other arguments (positional ones too, at run time) as PopenOptions.
        @overload
        def __init__(
            self: Popen[str],
            args: _CMD,
            *,
            text: Literal[True],
            universal_newlines: Optional[bool] = None,
            encoding: Optional[str] = None,
            errors: Optional[str] = None,
            **options: Unpack[PopenOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: Popen[str],
            args: _CMD,
            *,
            encoding: str,
            text: Optional[bool] = None,
            universal_newlines: Optional[bool] = None,
            errors: Optional[str] = None,
            **options: Unpack[PopenOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: Popen[str],
            args: _CMD,
            *,
            errors: str,
            text: Optional[bool] = None,
            universal_newlines: Optional[bool] = None,
            encoding: Optional[str] = None,
            **options: Unpack[PopenOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: Popen[str],
            args: _CMD,
            *,
            universal_newlines: Literal[True],
            text: Optional[bool] = None,
            encoding: Optional[str] = None,
            errors: Optional[str] = None,
            **options: Unpack[PopenOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: Popen[bytes],
            args: _CMD,
            *,
            text: Literal[False, None] = None,
            universal_newlines: Literal[False, None] = None,
            encoding: None = None,
            errors: None = None,
            **options: Unpack[PopenOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: Popen[Any],
            args: _CMD,
            *,
            text: Optional[bool] = None,
            universal_newlines: Optional[bool] = None,
            encoding: Optional[str] = None,
            errors: Optional[str] = None,
            **options: Unpack[PopenOptions],
        ) -> None: ...
        def __init__(self, args: _CMD, **options: Any) -> None: ...
    else:
        __init__ = _popen_init

    @property
    def command_pid(self) -> Optional[int]:
        """The command's own pid (the keeper's child), or ``pid`` without a keeper."""
        return self.pid if self.containment != "keeper" else self._rr_command_pid

    # ------------------------------------------------------------ start-up

    def _rr_await_start(self, link: KeeperLink, program: str) -> Optional[BaseException]:
        """None once the keeper says the command runs, else what ``subprocess`` would raise."""
        exec_errno: list[int] = []

        def exec_error(code: int) -> str:
            exec_errno.append(code)
            return os.strerror(code)

        def keeper_status() -> int:
            self._rr_settle(None)
            return -1 if self.returncode is None else int(self.returncode)

        problem = link.await_start(keeper_status, exec_error)
        if problem is None:
            return None
        if exec_errno:
            return OSError(exec_errno[0], os.strerror(exec_errno[0]), program)
        return subprocess.SubprocessError(f"cannot start {program}: {problem}")

    def _rr_register(self, link: Optional[KeeperLink]) -> None:
        dispatch = _PopenDispatch(
            pid=self.pid,
            ticket_id="",
            session_id="",
            containment=self.containment,
            # Its pipes are only closed, never read, through this reference: the mode is moot.
            popen=cast("subprocess.Popen[bytes]", self),
            stdin_kind="pipe" if self.stdin is not None else "inherit",
            keeper=link,
        )
        self._rr_dispatch = dispatch
        REGISTRY.add(dispatch)

    # ------------------------------------------------------------ waiting

    def _internal_poll(self, _deadstate: Optional[int] = None, **_ignored: Any) -> Optional[int]:
        """Never blocks; never ``waitpid`` on a pid the package may have reaped."""
        if self.returncode is not None or self._rr_pin is None:
            return self.returncode
        if not self._rr_lock.acquire(False):
            return None  # another thread is collecting it
        try:
            if self.returncode is None and self._rr_pin.exited():
                self._rr_collect()
        finally:
            self._rr_lock.release()
        return self.returncode

    def _wait(self, timeout: Optional[float]) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.returncode is None and not self._rr_settle(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        # A stop under way ends with the tree: wait for it too, within the timeout.
        self._rr_join_stop(None if deadline is None else max(0.0, deadline - time.monotonic()))
        assert self.returncode is not None
        return self.returncode

    def _rr_settle(self, timeout: Optional[float]) -> bool:
        """Wait up to ``timeout`` (None: for ever) for the exit; collect it; True if it did."""
        pin = self._rr_pin
        if pin is None or self.returncode is not None:
            return True
        if not (pin.exited() or wait_any([pin], timeout)):
            return False
        with self._rr_lock:
            if self.returncode is None:
                self._rr_collect()
        return True

    def _rr_collect(self) -> None:
        """The process has exited: its status (reaped here, or by another call of the
        package), remembered for the drop-in functions; our pins closed."""
        pin = self._rr_pin
        assert pin is not None
        status: Optional[ExitStatus] = pin.collect() or BOOK.lookup(pin.backend, pin.pid)
        if status is not None:
            BOOK.remember(pin.pid, pin.starttime, status)
        # Like subprocess when the exit cannot be had (someone else reaped it): 0.
        self.returncode = 0 if status is None else status.return_code
        self._rr_pin = None
        pin.close()
        if self._rr_command is not None:
            self._rr_command.close()
            self._rr_command = None
        dispatch = self._rr_dispatch
        if dispatch is not None and not dispatch.released:
            # A keeper that died without its final report (SIGKILLed, say) stopped
            # nothing: what its command left is stopped from here, as every face does.
            log = resolve_logger(None).bind(pid=self.pid)
            lost = lost_keeper_stop(dispatch, grace_s=self.grace_ms / 1000.0, log=log)
            if lost is not None:
                self._rr_sweeper = threading.Thread(
                    target=drive, args=(lost,), name=f"ralph-reaper-sweep-{self.pid}", daemon=True
                )
                self._rr_sweeper.start()
        REGISTRY.release(self.pid)

    def _rr_backend(self) -> Backend:
        """The backend the command was started with (pins must not mix backends)."""
        pin = self._rr_pin
        return get_backend() if pin is None else pin.backend

    def _rr_join_stop(self, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self._rr_stopper, self._rr_sweeper):
            if thread is not None and thread is not threading.current_thread():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------ signals and stops

    def send_signal(self, sig: int) -> None:
        """Deliver ``sig`` to the command itself (not the keeper), if it still runs."""
        self.poll()
        if self.returncode is not None:
            return
        target = self._rr_command if self.containment == "keeper" else self._rr_pin
        if target is not None:
            target.signal(int(sig))

    def terminate(
        self, *, grace_ms: Optional[float] = None, eof_wait_ms: Optional[float] = None
    ) -> None:
        """Stop the whole tree: EOF where this object holds the command's stdin, then
        SIGTERM and SIGCONT, then SIGKILL after ``grace_ms`` (default :attr:`grace_ms`).

        Returns at once, as ``subprocess`` does: the stop runs on a thread of
        its own (under a keeper, mostly in the keeper), and :meth:`wait` returns
        once it is over.
        """
        grace_s = check_ms("grace_ms", self.grace_ms if grace_ms is None else grace_ms) / 1000.0
        eof_ms = self.eof_wait_ms if eof_wait_ms is None else eof_wait_ms
        eof_s = check_ms("eof_wait_ms", eof_ms) / 1000.0
        self.poll()
        if self.returncode is not None:
            return
        self._rr_start_stop(grace_s, eof_s, int(signal.SIGTERM))

    def kill(self) -> None:
        """SIGKILL the whole tree now; :meth:`wait` then reaps.

        Under a keeper it returns at once (the keeper kills its tree); without
        one it returns once the members it found are dead, a matter of
        microseconds, so that none of them is left for a stop thread to miss.
        """
        self.poll()
        if self.returncode is not None:
            return
        dispatch = self._rr_dispatch
        keeper = None if dispatch is None else dispatch.keeper
        if keeper is not None and keeper.request_stop(0):
            return  # the keeper kills its tree at once (grace 0) and exits
        stopper = self._rr_stopper
        if stopper is None or not stopper.is_alive():
            self._rr_stop(0.0, 0.0, int(signal.SIGKILL))
            return
        # A terminate is under way: it pinned the tree and reaps it; hurry it up.
        backend = self._rr_backend()
        pin = Pin.open(backend, self.pid)
        if pin is None:
            return
        members = Members(backend, pin, "session")
        try:
            members.discover()
            for member in members.live():
                member.signal(int(signal.SIGKILL))
        finally:
            members.close()

    def _rr_start_stop(self, grace_s: float, eof_s: float, first_signal: int) -> None:
        with self._rr_lock:
            running = self._rr_stopper
            if running is not None and running.is_alive():
                return
            stopper = threading.Thread(
                target=self._rr_stop,
                args=(grace_s, eof_s, first_signal),
                name=f"ralph-reaper-stop-{self.pid}",
                daemon=True,
            )
            self._rr_stopper = stopper
        stopper.start()

    def _rr_stop(self, grace_s: float, eof_s: float, first_signal: int) -> None:
        """The package's stop sequence for this dispatch (the one every face runs)."""
        log = resolve_logger(None).bind(pid=self.pid)
        try:
            leader = Pin.open(self._rr_backend(), self.pid)
            if leader is None:
                return
            try:
                stop = dispatch_stop(
                    leader,
                    self._rr_dispatch,
                    containment="session",
                    grace_s=grace_s,
                    eof_wait_s=eof_s,
                    log=log,
                    first_signal=first_signal,
                )
                outcome = run_registered(stop, "terminate")
            finally:
                leader.close()
            if not outcome.success:
                log.error(
                    "pid %d: could not stop its tree; survivors: %s", self.pid, outcome.survivors
                )
        except Exception as exc:  # a thread of ours must never die with a traceback
            log.error("pid %d: the stop failed: %r", self.pid, exc)
