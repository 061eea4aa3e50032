"""``ralph-reaper run``: coreutils ``timeout`` for whole process trees.

The command runs under a keeper (native build) or in a new session, this
process being a child subreaper so that whatever the tree orphans comes back
to it. The timeout and the signals this process receives start stops through
the engine (:func:`completion.terminate`), on a thread of their own; the
main thread only waits, so the result is always the one the engine's watch
builds, whatever ended the command. Exit statuses are ``timeout``'s.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import resource
import signal
import sys
import threading
from types import FrameType, SimpleNamespace
from typing import Any, Optional

from .backends import BackendUnavailableError
from .backends import get as get_backend
from .cli_args import STDERR, RunOptions, UsageError, parse_run, signal_name
from .cli_report import deliver, describe, emit, noteworthy, run_record
from .completion import run_watch, terminate
from .dispatches import REGISTRY, Dispatch
from .ending import launch_failed
from .engine import drive, orphans_stop
from .logs import resolve_logger
from .pins import Pin
from .results import DispatchCompletionResult
from .spawning import spawn_dispatch
from .watches import prepare

EXIT_TIMEOUT = 124
EXIT_LAUNCHER = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

#: Signals that stop the tree, beginning with the signal received (``timeout``'s set).
TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: Signals passed on to the command as they are. Job control (TSTP, TTIN, TTOU)
#: keeps its default meaning for this process; faults are never caught.
FORWARDED = (
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGURG,
    signal.SIGIO,
    signal.SIGPWR,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)

USAGE = "usage: ralph-reaper run [OPTION]... [DURATION] [--] COMMAND [ARG]..."

HELP = f"""{USAGE}

Run COMMAND; if it still runs after DURATION, stop it and its whole tree
(everything it started, however it detached), then report how it ended.
Options and exit statuses are those of coreutils timeout(1).

  DURATION, --timeout=D  stop the tree after D (e.g. 500ms, 10, 10s, 1.5m, 2h, 1d;
                         0 = never, the default)
  -s, --signal=SIG       first signal of a stop on timeout (default TERM)
  -k, --kill-after=D     then SIGKILL what is left after D (default 5s; alias --grace)
      --preserve-status  on timeout, exit with the command's status, not 124
      --foreground       keep the terminal: COMMAND runs in this process's group,
                         can read the tty and gets the tty's signals; its tree is
                         still stopped on timeout
      --eof-wait=D       begin a stop with EOF on COMMAND's stdin (then a pipe fed
                         from this one) and wait up to D before the first signal
      --idle-timeout=D   stop the tree once COMMAND has sat idle at its stdin for D
      --json[=TARGET]    the JSON report (docs/cli.md): on stderr; '=-' stdout;
                         '=PATH' a file, written atomically
      --exit-file=PATH   also write the JSON report to PATH, atomically
      --ticket=ID        ticket id to report (default: run)
  -q, --quiet            no report line on stderr
  -v, --verbose          a report line even on success, and each step logged
  -h, --help             this help

SIGINT, SIGTERM, SIGHUP and SIGQUIT to this process stop the tree, beginning
with that signal; other signals (USR1, USR2, WINCH, CONT, ALRM, ...) are passed
on to COMMAND. Silent on success; one line on stderr on a timeout, a stop or a
failure.

Exit status: 124 timed out (the command's own with --preserve-status, 137 if it
had to be killed by SIGKILL); 125 this program's own error, usage included;
126 COMMAND found but not executable; 127 COMMAND not found; else COMMAND's
status (a COMMAND killed by signal N: this process ends by signal N too, so
a shell sees 128+N).
"""


def cmd_run(argv: list[str]) -> int:
    opts = RunOptions()
    try:
        parse_run(argv, opts)
    except UsageError as exc:
        emit(f"ralph-reaper run: {exc}", sys.stderr)
        emit(f"{USAGE}\nTry 'ralph-reaper run --help' for more information.", sys.stderr)
        _report_failure(opts, str(exc), opts.command or None)
        return EXIT_LAUNCHER
    if opts.help:
        emit(HELP.rstrip("\n"))
        return 0
    if opts.verbose:
        logging.basicConfig(level=logging.DEBUG, format="ralph-reaper: %(message)s")
    return _Run(opts).main()


def _backend_name() -> str:
    try:
        return get_backend().name
    except BackendUnavailableError:
        return ""


def _report_failure(opts: RunOptions, error: str, command: Optional[list[str]]) -> None:
    """The JSON report of a run that never started (usage, backend): still one, as always."""
    if opts.json is None and opts.exit_file is None:
        return
    result = launch_failed(SimpleNamespace(error=error), opts.ticket, _backend_name())
    _deliver(opts, result, command, EXIT_LAUNCHER, None, launched=False)


def _deliver(
    opts: RunOptions,
    result: DispatchCompletionResult,
    command: Optional[list[str]],
    status: int,
    exit_signal: Optional[int],
    *,
    launched: bool,
    received: Optional[list[int]] = None,
    forwarded: Optional[list[int]] = None,
) -> None:
    record = run_record(
        result,
        command=command,
        exit_status=status,
        exit_signal=exit_signal,
        launched=launched,
        timeout_s=opts.timeout_s,
        kill_after_s=opts.kill_after_s,
        stop_signal=opts.stop_signal,
        received=received or [],
        forwarded=forwarded or [],
    )
    if opts.exit_file is not None:
        deliver(opts.exit_file, record)
    if opts.json is not None:
        deliver(opts.json, record)


def exit_status(result: DispatchCompletionResult, opts: RunOptions) -> tuple[int, Optional[int]]:
    """``timeout``'s exit status for a result, and the signal to end by (else None)."""
    if result.termination_method == "failed":
        return (EXIT_TIMEOUT if result.timed_out else EXIT_LAUNCHER), None
    sig = result.signal
    if sig is None and result.return_code is None:
        return EXIT_LAUNCHER, None
    own = 128 + sig if sig is not None else (result.return_code or 0) & 0xFF
    if result.timed_out:
        # timeout(1): a command it had to SIGKILL reports 137, so that a kill shows.
        if opts.preserve_status or sig == signal.SIGKILL:
            return own, None
        return EXIT_TIMEOUT, None
    return own, sig


def _launch_status(error: str) -> int:
    if error.startswith("command not found"):
        return EXIT_NOT_FOUND
    if error.startswith("cannot execute"):
        return EXIT_NOT_EXECUTABLE
    return EXIT_LAUNCHER


class _Run:
    """One ``run``: the launch, the wait, the stops that signals and the timeout start."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.lock = threading.Lock()
        self.events: queue.SimpleQueue[Optional[int]] = queue.SimpleQueue()
        self.received: list[int] = []
        self.forwarded: list[int] = []
        #: "launching", "running" (stops may start), "ending" (the command is over).
        self.phase = "launching"
        self.pending: Optional[tuple[int, str]] = None
        self.pid: Optional[int] = None
        self.command_pin: Optional[Pin] = None
        self.stop_thread: Optional[threading.Thread] = None
        self.timer_cancel = threading.Event()
        self.previous: dict[int, Any] = {}
        #: Signals to forward that came before the command could be pinned.
        self.early_forward: list[int] = []

    # ----------------------------------------------------------------- main

    def main(self) -> int:
        opts = self.opts
        try:
            backend = get_backend()
        except BackendUnavailableError as exc:
            emit(f"ralph-reaper: {exc}", sys.stderr)
            _report_failure(opts, str(exc), opts.command)
            return EXIT_LAUNCHER
        # This process exists only for the command: as a subreaper it inherits
        # whatever the tree orphans (where no keeper does), swept at the end.
        with contextlib.suppress(OSError):
            backend.set_child_subreaper(True)
        listener = threading.Thread(target=self._listen, name="ralph-reaper-signals", daemon=True)
        listener.start()
        self._install()
        launched = False
        try:
            result, launch_code = self._launch_and_wait()
            launched = launch_code is None
        except Exception as exc:  # never leave without a report, nor the tree behind
            self._emergency_stop()
            result = launch_failed(
                SimpleNamespace(error=f"internal error: {exc!r}"), opts.ticket, backend.name
            )
            launch_code = EXIT_LAUNCHER
        finally:
            self.timer_cancel.set()
            self.events.put(None)
            listener.join()
        if launch_code is not None:
            code, die_by = launch_code, None
        else:
            code, die_by = exit_status(result, opts)
        self._tell(result, launched)
        _deliver(
            opts,
            result,
            opts.command,
            code,
            die_by,
            launched=launched,
            received=self.received,
            forwarded=self.forwarded,
        )
        if die_by is not None:
            _end_by_signal(die_by)
        return code

    def _tell(self, result: DispatchCompletionResult, launched: bool) -> None:
        if not launched:
            emit(f"ralph-reaper: {result.error}", sys.stderr)
            return
        if self.opts.quiet or not (self.opts.verbose or noteworthy(result)):
            return
        line = describe(result, os.path.basename(self.opts.command[0]))
        if result.stop_reason == "signal" and self.received:
            line += f"; on {signal_name(self.received[0])} to ralph-reaper"
        emit(f"ralph-reaper: {line}", sys.stderr)

    # ----------------------------------------------------------------- the command

    def _launch_and_wait(self) -> tuple[DispatchCompletionResult, Optional[int]]:
        """The result, and the exit status when it is one of the launcher's own."""
        opts = self.opts
        log = resolve_logger(None)
        backend = get_backend()
        dispatch = spawn_dispatch(
            opts.command,
            ticket_id=opts.ticket,
            stdin="pipe" if opts.eof_wait_s > 0 else "inherit",
            grace_ms=opts.kill_after_s * 1000.0,
            die_with_parent=True,
            foreground=opts.foreground,
        )
        if dispatch.status != "launched" or dispatch.pid is None:
            error = dispatch.error or "cannot start the command"
            return launch_failed(dispatch, opts.ticket, backend.name), _launch_status(error)
        spawned = REGISTRY.get(dispatch.pid)
        command_pid = dispatch.pid if spawned is None else spawned.leader_pid
        pin = Pin.open(backend, command_pid)
        with self.lock:
            self.command_pin = pin
            early, self.early_forward = self.early_forward, []
        for signum in early:  # came between the start and the pin
            self._forward(signum)
        try:
            if opts.eof_wait_s > 0 and spawned is not None and spawned.stdin_fd is not None:
                os.set_blocking(spawned.stdin_fd, False)
                threading.Thread(
                    target=_forward_stdin, args=(spawned,), name="ralph-reaper-stdin", daemon=True
                ).start()
            prepared = prepare(
                dispatch,
                opts.ticket,
                log=log,
                graceful_shutdown_ms=opts.kill_after_s * 1000.0,
                idle_timeout_ms=opts.idle_timeout_s * 1000.0,
                eof_wait_ms=opts.eof_wait_s * 1000.0,
            )
            if isinstance(prepared, DispatchCompletionResult):
                return prepared, None
            prepared.limit_s = opts.timeout_s  # the timeout is ours (below): for messages
            self._arm(dispatch.pid)
            result = run_watch(prepared)
            self._disarm()
            # What the tree orphaned to this process (a subreaper) is stopped too.
            swept = orphans_stop(grace_s=opts.kill_after_s, log=log)
            if swept is not None:
                result.descendants_killed += drive(swept).descendants_killed
            return result, None
        finally:
            with self.lock:
                pin, self.command_pin = self.command_pin, None
            if pin is not None:
                pin.close()

    def _arm(self, pid: int) -> None:
        with self.lock:
            self.pid = pid
            self.phase = "running"
            pending, self.pending = self.pending, None
        if pending is not None:  # a signal that came during the launch
            self._begin_stop(*pending)
        if self.opts.timeout_s > 0:
            threading.Thread(target=self._timer, name="ralph-reaper-timeout", daemon=True).start()

    def _disarm(self) -> None:
        self.timer_cancel.set()
        with self.lock:
            self.phase = "ending"
            thread = self.stop_thread
        if thread is not None:
            thread.join()

    def _timer(self) -> None:
        if not self.timer_cancel.wait(self.opts.timeout_s):
            self._begin_stop(self.opts.stop_signal, "timeout")

    def _begin_stop(self, first_signal: int, reason: str) -> None:
        """Start the one stop of this run; later requests join it (the first one wins)."""
        with self.lock:
            if self.phase == "launching":
                self.pending = self.pending or (first_signal, reason)
                return
            if self.phase != "running" or self.stop_thread is not None or self.pid is None:
                return
            pin = self.command_pin
            if reason == "signal" and pin is not None and pin.exited():
                # The command is over and what it left is being stopped (by its
                # keeper, or by the watch's sweep): that stop goes on unchanged.
                return
            pid = self.pid
            self.stop_thread = threading.Thread(
                target=self._stop,
                args=(pid, first_signal, reason),
                name="ralph-reaper-stop",
                daemon=True,
            )
            self.stop_thread.start()

    def _stop(self, pid: int, first_signal: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            terminate(
                pid,
                kill_wait_ms=self.opts.kill_after_s * 1000.0,
                eof_wait_ms=self.opts.eof_wait_s * 1000.0,
                first_signal=first_signal,
                reason=reason,
            )

    def _emergency_stop(self) -> None:
        with self.lock:
            pid, self.phase = self.pid, "ending"
        if pid is not None:
            with contextlib.suppress(Exception):
                terminate(pid, kill_wait_ms=self.opts.kill_after_s * 1000.0, reason="signal")

    # ----------------------------------------------------------------- signals

    def _install(self) -> None:
        for sig in (*TERMINATING, *FORWARDED):
            with contextlib.suppress(OSError, ValueError):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        """Only queues the signal: a handler that raised or took a lock could break
        whatever the main thread was doing (a stop, a sweep, a report)."""
        self.events.put(signum)

    def _listen(self) -> None:
        while True:
            signum = self.events.get()
            if signum is None:
                return
            if signum in TERMINATING:
                self.received.append(signum)
                self._begin_stop(signum, "signal")
            else:
                self._forward(signum)

    def _forward(self, signum: int) -> None:
        with self.lock:
            pin = self.command_pin
            if pin is None and self.phase == "launching":
                self.early_forward.append(signum)
            elif pin is not None and pin.signal(signum):
                self.forwarded.append(signum)


def _end_by_signal(sig: int) -> None:
    """End this process by ``sig``, as ``timeout`` does when its command died of it, so
    that the caller sees the same death (a shell: 128+N; it also stops on SIGINT)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    with contextlib.suppress(OSError, ValueError):
        signal.signal(sig, signal.SIG_DFL)
    with contextlib.suppress(OSError, ValueError):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)


def _forward_stdin(dispatch: Dispatch) -> None:
    """Copy this process's stdin to the command's stdin pipe, and pass its EOF on.

    The pipe (rather than the inherited fd) is what lets a stop begin with
    EOF; forwarding keeps ``run`` transparent for input all the same. A
    daemon thread: a read of a terminal that never ends must not keep the
    process alive.
    """
    while True:
        try:
            data = os.read(0, 65536)
        except OSError:  # no stdin at all: as good as an empty one
            data = b""
        if not data:
            dispatch.send_eof()
            return
        view = memoryview(data)
        while view:
            written = dispatch.feed_stdin(view)
            if written < 0:  # closed: the command ended, or a stop began with EOF
                return
            if written == 0:
                dispatch.wait_writable(1.0)
            view = view[written:]


__all__ = ["EXIT_LAUNCHER", "EXIT_TIMEOUT", "HELP", "STDERR", "cmd_run", "exit_status"]
