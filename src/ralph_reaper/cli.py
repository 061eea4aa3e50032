"""The ``ralph-reaper`` command line.

``run`` is coreutils ``timeout`` for process trees: it starts a command in a
new session, waits for it event-driven, stops the whole tree (not just the
leader) when time runs out, and reports how it ended. Exit statuses follow
``timeout``: 124 timed out, 125 the launcher failed, 126 not executable,
127 not found, 128+N killed by signal N, else the command's own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Optional

from . import __version__
from .backends import BackendUnavailableError, backend_info
from .backends import get as get_backend
from .completion import run_watch, terminate
from .dispatches import REGISTRY, Dispatch
from .ending import launch_failed
from .engine import drive, orphans_stop
from .logs import resolve_logger
from .pins import Pin
from .results import DispatchCompletionResult, DispatchCompletionStatus
from .spawning import spawn_dispatch
from .tracking import write_json_file
from .validation import check_pid
from .waiting import wait_any
from .watches import prepare

EXIT_TIMEOUT = 124
EXIT_LAUNCHER = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h|d|)\s*$")


def parse_duration(text: str) -> float:
    """Seconds from ``500ms``, ``2s``, ``1.5m``, ``1h``, ``1d`` or a bare number of seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number with an optional unit ms, s, m, h or d"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if math.isinf(seconds) or math.isnan(seconds):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}")
    return seconds


def _describe(result: DispatchCompletionResult, command: str) -> str:
    seconds = result.duration_ms / 1000.0
    if result.signal is not None:
        try:
            how = f"killed by {signal.Signals(result.signal).name}"
        except ValueError:
            how = f"killed by signal {result.signal}"
    elif result.return_code is not None:
        how = f"exit {result.return_code}"
    else:
        how = "exit status unknown"
    if result.timed_out or result.termination_method not in ("natural", ""):
        stages = ", ".join(f"{k} {v:.1f} ms" for k, v in result.stage_ms.items())
        text = (
            f"{command}: {result.status.value} after {seconds:.2f} s; "
            f"stopped by {result.termination_method} ({stages}); {how}"
        )
    else:
        text = f"{command}: {result.status.value} after {seconds:.2f} s; {how}"
    if result.descendants_killed:
        text += f"; {result.descendants_killed} descendant(s) stopped"
    if result.termination_method == "failed" and result.error:
        text += f"; {result.error}"
    return text


def _exit_status(result: DispatchCompletionResult) -> int:
    if result.timed_out and result.status != DispatchCompletionStatus.ERROR:
        return EXIT_TIMEOUT
    if result.termination_method == "failed":
        return EXIT_TIMEOUT if result.timed_out else EXIT_LAUNCHER
    if result.signal is not None:
        return 128 + result.signal
    if result.return_code is None:
        return EXIT_LAUNCHER
    return result.return_code & 0xFF


def cmd_run(args: argparse.Namespace) -> int:
    argv: list[str] = args.command
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(
            "ralph-reaper run: no command given (usage: run [options] -- CMD...)", file=sys.stderr
        )
        return EXIT_LAUNCHER
    try:
        backend = get_backend()
    except BackendUnavailableError as exc:
        print(f"ralph-reaper: {exc}", file=sys.stderr)
        return EXIT_LAUNCHER
    # This process exists only for the command: as a subreaper it inherits
    # whatever the tree orphans (where no keeper does), so even detached
    # daemons are stopped below.
    with contextlib.suppress(OSError):
        backend.set_child_subreaper(True)
    stopper = _SignalStop(args)
    previous = {sig: signal.signal(sig, stopper.handle) for sig in _TERMINATING}
    try:
        result, status = _launch_and_wait(args, argv, stopper)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _report(args, argv, result)
    if stopper.signum is not None and result.stop_reason == "signal":
        return 128 + stopper.signum
    return status if status is not None else _exit_status(result)


#: Signals that stop the dispatch (the stop begins with the signal received).
_TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _SignalStop:
    """Turns a termination signal to ``run`` into a stop of the tree, on its own thread.

    The handler never raises: the wait in the main thread goes on, sees the
    leader end, and reports the stop that ended it (the engine lists stops in
    progress), so the result is built the same way as every other.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.signum: Optional[int] = None
        self.pid: Optional[int] = None
        self.thread: Optional[threading.Thread] = None

    def handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        if self.signum is None:
            self.signum = signum
        self.start()

    def start(self) -> None:
        if self.signum is None or self.pid is None or self.thread is not None:
            return
        self.thread = threading.Thread(target=self._stop, name="ralph-reaper-stop", daemon=True)
        self.thread.start()

    def _stop(self) -> None:
        assert self.pid is not None and self.signum is not None
        with contextlib.suppress(Exception):
            terminate(
                self.pid,
                kill_wait_ms=self.args.grace * 1000.0,
                eof_wait_ms=self.args.eof_wait * 1000.0,
                reason="signal",
            )


def _launch_and_wait(
    args: argparse.Namespace, argv: list[str], stopper: _SignalStop
) -> tuple[DispatchCompletionResult, Optional[int]]:
    """The result, and the exit status when it is one of the launcher's own (126, 127, 125)."""
    dispatch = spawn_dispatch(
        argv,
        ticket_id=args.ticket,
        stdin="pipe" if args.eof_wait > 0 else "inherit",
        grace_ms=args.grace * 1000.0,
        die_with_parent=True,
    )
    if dispatch.status != "launched" or dispatch.pid is None:
        error = dispatch.error or "cannot start the command"
        print(f"ralph-reaper: {error}", file=sys.stderr)
        status = EXIT_LAUNCHER
        if error.startswith("command not found"):
            status = EXIT_NOT_FOUND
        elif error.startswith("cannot execute"):
            status = EXIT_NOT_EXECUTABLE
        return launch_failed(dispatch, args.ticket, get_backend().name), status
    spawned = REGISTRY.get(dispatch.pid)
    if args.eof_wait > 0 and spawned is not None and spawned.stdin_fd is not None:
        os.set_blocking(spawned.stdin_fd, False)
        threading.Thread(
            target=_forward_stdin, args=(spawned,), name="ralph-reaper-stdin", daemon=True
        ).start()
    prepared = prepare(
        dispatch,
        args.ticket,
        log=resolve_logger(None),
        timeout_ms=args.timeout * 1000.0,
        graceful_shutdown_ms=args.grace * 1000.0,
        idle_timeout_ms=args.idle_timeout * 1000.0,
        eof_wait_ms=args.eof_wait * 1000.0,
    )
    if isinstance(prepared, DispatchCompletionResult):
        return prepared, None
    stopper.pid = dispatch.pid
    stopper.start()  # a signal that came during the launch
    result = run_watch(prepared)
    if stopper.thread is not None:
        stopper.thread.join()
    swept = orphans_stop(grace_s=args.grace, log=resolve_logger(None))
    if swept is not None:
        result.descendants_killed += drive(swept).descendants_killed
    return result, None


def _report(args: argparse.Namespace, argv: list[str], result: DispatchCompletionResult) -> None:
    record = result.to_dict()
    record["command"] = argv
    if args.exit_file:
        try:
            write_json_file(Path(args.exit_file), record)
        except OSError as exc:
            print(f"ralph-reaper: cannot write {args.exit_file}: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps(record, sort_keys=True), flush=True)
    elif not args.quiet:
        print(f"ralph-reaper: {_describe(result, os.path.basename(argv[0]))}", file=sys.stderr)


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


def cmd_watch(args: argparse.Namespace) -> int:
    backend = get_backend()
    pins: list[Pin] = []
    for raw in args.pids:
        try:
            pid = check_pid(int(raw))
        except ValueError as exc:
            print(f"ralph-reaper watch: bad pid {raw!r}: {exc}", file=sys.stderr)
            for pin in pins:
                pin.close()
            return 2
        opened = Pin.open(backend, pid)
        if opened is None:
            print(f"{pid}: not running", flush=True)
        else:
            pins.append(opened)
    deadline = None if args.timeout <= 0 else args.timeout
    import time

    started = time.monotonic()
    try:
        while pins:
            left = None if deadline is None else deadline - (time.monotonic() - started)
            if left is not None and left <= 0:
                return EXIT_TIMEOUT
            for pin in wait_any(pins, left):
                status = pin.collect()
                code = "unknown" if status is None else str(status.return_code)
                print(f"{pin.pid}: exited {code}", flush=True)
                pins.remove(pin)
                pin.close()
    finally:
        for pin in pins:
            pin.close()
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    info = backend_info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"ralph-reaper {__version__}")
    print(f"backend: {info['backend']} ({info['reason']})")
    for name, ok in info["available"].items():
        why = info["unavailable_because"].get(name, "")
        print(f"  {name:8} {'available' if ok else 'unavailable: ' + why}")
    print("kernel features:")
    for key, value in info["features"].items():
        print(f"  {key:18} {value}")
    return 0


def _source_root() -> Optional[Path]:
    """The repository root when the package runs from a source checkout (``src/`` layout)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks" / "run.py").is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite; it lives beside the package, not in it."""
    root = _source_root()
    if root is None:
        print(
            "ralph-reaper: the benchmarks are not part of the installed package; run them "
            "from a source checkout of ralph-reaper:\n"
            "  pip install -e . && python -m benchmarks.run [--quick] [--out BENCHMARKS.md]",
            file=sys.stderr,
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import importlib

    runner: Any = importlib.import_module("benchmarks.run")
    argv = ["--out", args.out]
    if args.quick:
        argv.append("--quick")
    if args.backends:
        argv += ["--backends", args.backends]
    if args.only:
        argv += ["--only", args.only]
    return int(runner.main(argv))


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, declared in one place (long, but only declarations)."""
    parser = argparse.ArgumentParser(
        prog="ralph-reaper",
        description="Supervise process trees: exact exit reporting, graceful stop, no leftovers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser(
        "run",
        help="run a command, stop its whole tree on timeout, report how it ended",
        description="Run CMD in a new session; on timeout stop its whole tree "
        "(SIGTERM+SIGCONT, then SIGKILL after --grace). Exit status as timeout(1): "
        "124 timed out, 125 launcher failure, 126/127 not executable/not found, "
        "128+N killed by signal N, else the command's.",
    )
    run.add_argument(
        "--timeout",
        type=parse_duration,
        default=0.0,
        metavar="D",
        help="stop the tree after D (e.g. 500ms, 2s, 1.5m; 0 = never)",
    )
    run.add_argument(
        "--grace",
        type=parse_duration,
        default=5.0,
        metavar="D",
        help="time between SIGTERM and SIGKILL (default 5s)",
    )
    run.add_argument(
        "--eof-wait",
        type=parse_duration,
        default=0.0,
        metavar="D",
        help="begin a stop with EOF on CMD's stdin and wait up to D before SIGTERM; "
        "CMD's stdin is then a pipe fed from this one (default 0: no EOF stage, "
        "CMD inherits stdin)",
    )
    run.add_argument(
        "--idle-timeout",
        type=parse_duration,
        default=0.0,
        metavar="D",
        help="stop the tree once CMD has sat idle at its stdin for D (0 = never)",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    run.add_argument("--exit-file", metavar="P", help="also write the JSON result to P atomically")
    run.add_argument("--ticket", default="run", help="ticket id to report (default: run)")
    run.add_argument("-q", "--quiet", action="store_true", help="no report line on stderr")
    run.add_argument("-v", "--verbose", action="store_true", help="log each step on stderr")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    run.set_defaults(func=cmd_run)

    watch = sub.add_parser("watch", help="wait for any processes to exit (children or not)")
    watch.add_argument("--timeout", type=parse_duration, default=0.0, metavar="D")
    watch.add_argument("pids", nargs="+", metavar="PID")
    watch.set_defaults(func=cmd_watch)

    doctor = sub.add_parser("doctor", help="show the backend in use and the kernel's features")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    bench = sub.add_parser(
        "bench",
        help="run the benchmarks (from a source checkout)",
        description="Run benchmarks/run.py: scenarios S1-S6 for every backend and baseline, "
        "printed as tables and written to --out.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes, few runs (a smoke test)")
    bench.add_argument("--out", default="BENCHMARKS.md", metavar="FILE", help="report file")
    bench.add_argument("--backends", default="", metavar="LIST", help="comma-separated")
    bench.add_argument("--only", default="", metavar="LIST", help="scenarios, e.g. S1,S4")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.DEBUG, format="ralph-reaper: %(message)s")
    func: Any = args.func
    try:
        return int(func(args))
    except BackendUnavailableError as exc:
        print(f"ralph-reaper: {exc}", file=sys.stderr)
        return EXIT_LAUNCHER


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
