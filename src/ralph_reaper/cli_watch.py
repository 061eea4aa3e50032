"""``ralph-reaper watch``: util-linux ``waitpid(1)`` with exit codes.

Like ``waitpid`` it waits for processes that need not be its children
(through pidfds, or polling), for all of them or the first ``-c N``, with
``-t`` for a time limit and ``-e`` to accept pids that already exited. Unlike
it, it can say how each ended, where the kernel still tells (the exit info
kept on the pidfd since Linux 6.15, or a zombie's entry in ``/proc``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional

from .backends import get as get_backend
from .backends.base import ExitStatus
from .cli_args import UsageError, parse_duration, parse_pid
from .cli_report import SCHEMA, emit, write_atomically
from .pins import Pin
from .waiting import wait_any

EXIT_FAILURE = 1
EXIT_TIMEOUT_EXPIRED = 3
EXIT_USAGE = 125


def add_parser(sub: Any) -> None:
    watch = sub.add_parser(
        "watch",
        help="wait for processes to exit, children or not (util-linux waitpid)",
        description="Wait for every PID to exit (or the first N with -c), children of this "
        "process or not. Exit status as waitpid(1): 0 done, 1 a PID is not running (without "
        "-e), 3 the timeout expired; 125 bad usage.",
    )
    watch.add_argument("-v", "--verbose", action="store_true", help="a line per exit on stdout")
    watch.add_argument(
        "-t", "--timeout", default="0", metavar="D", help="give up after D (0 = never; 10, 1.5s...)"
    )
    watch.add_argument(
        "-c", "--count", default="0", metavar="N", help="wait for N exits only (default: all)"
    )
    watch.add_argument(
        "-e", "--exited", action="store_true", help="a PID that has already exited is no error"
    )
    watch.add_argument(
        "--json",
        action="store_const",
        const="-",
        help="one JSON object per PID (docs/cli.md) on stdout; --json=PATH: in a file",
    )
    watch.add_argument("--json-path", dest="json", metavar="PATH", help=argparse.SUPPRESS)
    watch.add_argument("pids", nargs="+", metavar="PID")
    watch.set_defaults(func=cmd_watch, parser=watch)


def spell_json(words: list[str]) -> list[str]:
    """``--json=PATH`` as argparse can take it, while a bare ``--json`` never eats the
    next word (a PID): the two spellings ``run`` has too."""
    out: list[str] = []
    for i, word in enumerate(words):
        if word == "--":
            return out + words[i:]
        if word.startswith("--json="):
            word = "--json-path=" + word[len("--json=") :]
        out.append(word)
    return out


def _learned(pin: Pin, status: Optional[ExitStatus]) -> str:
    """Where the exit code came from: a reap, the pidfd's exit info, a zombie's /proc entry."""
    if status is None:
        return "unknown"
    if pin.reaped:
        return "waitid"
    if pin.fd >= 0 and pin.backend.pidfd_exit_status(pin.fd) is not None:
        return "pidfd"
    return "proc"


def _record(
    pid: int, status: Optional[ExitStatus], learned: Optional[str], exited: bool
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "pid": pid,
        "exited": exited,
        "return_code": None if status is None else status.return_code,
        "signal": None if status is None else status.signal,
        "core_dumped": False if status is None else status.core_dumped,
        "learned": learned,
    }


def _parse(args: argparse.Namespace) -> tuple[list[int], int, float]:
    pids: list[int] = []
    for raw in args.pids:
        pid = parse_pid(raw)
        if pid not in pids:
            pids.append(pid)
    count_text: str = args.count
    if not count_text.isascii() or not count_text.isdigit():
        raise UsageError(f"invalid count {count_text!r}: use a positive number")
    count = int(count_text) or len(pids)
    if count > len(pids):
        raise UsageError(f"count {count} is more than the {len(pids)} PID(s) given")
    return pids, count, parse_duration(args.timeout)


class _Out:
    def __init__(self, args: argparse.Namespace) -> None:
        self.json: Optional[str] = args.json
        self.verbose: bool = args.verbose
        self.records: list[dict[str, Any]] = []

    def tell(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.json == "-":
            emit(json.dumps(record, sort_keys=True))
        elif self.verbose:
            pid = record["pid"]
            if not record["exited"]:
                emit(f"{pid}: still running")
            elif record["learned"] == "not_running":
                emit(f"{pid}: not running")
            elif record["signal"] is not None:
                emit(f"{pid}: exited: killed by signal {record['signal']} ({record['learned']})")
            elif record["return_code"] is not None:
                emit(f"{pid}: exited {record['return_code']} ({record['learned']})")
            else:
                emit(f"{pid}: exited, status unknown")

    def close(self) -> None:
        if self.json not in (None, "-"):
            assert self.json is not None
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
            try:
                write_atomically(self.json, text)
            except OSError as exc:
                emit(f"ralph-reaper watch: cannot write {self.json}: {exc.strerror}", sys.stderr)


def cmd_watch(args: argparse.Namespace) -> int:
    try:
        pids, count, timeout_s = _parse(args)
    except UsageError as exc:
        emit(f"ralph-reaper watch: {exc}", sys.stderr)
        return EXIT_USAGE
    if args.json == "":
        emit("ralph-reaper watch: --json= wants a path", sys.stderr)
        return EXIT_USAGE
    backend = get_backend()
    out = _Out(args)
    pins: list[Pin] = []
    done = 0
    try:
        for pid in pids:
            pin = Pin.open(backend, pid)
            if pin is not None:
                pins.append(pin)
                continue
            if not args.exited:
                emit(f"ralph-reaper watch: pid {pid}: no such process", sys.stderr)
                return EXIT_FAILURE
            out.tell(_record(pid, None, "not_running", True))
            done += 1
        started = time.monotonic()
        while done < count:
            left = None if timeout_s <= 0 else timeout_s - (time.monotonic() - started)
            if left is not None and left <= 0:
                for pin in pins:
                    out.tell(_record(pin.pid, None, None, False))
                return EXIT_TIMEOUT_EXPIRED
            for pin in wait_any(pins, left):
                status = pin.collect()
                out.tell(_record(pin.pid, status, _learned(pin, status), True))
                pins.remove(pin)
                pin.close()
                done += 1
        return 0
    finally:
        for pin in pins:
            pin.close()
        out.close()
