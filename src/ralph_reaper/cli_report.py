"""What the command line tells: the report line, the JSON report, and safe writes.

The JSON report is the contract with scripts (its keys are listed in
``docs/cli.md``), so it is written on every path, whole (files atomically),
and never where the command writes unless asked. Writes to a closed pipe
are dropped: a reader that went away (``| head``) must not change how the
command's end is reported by the exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
from typing import Any, Optional, TextIO

from . import __version__
from .results import DispatchCompletionResult

#: Version of the JSON reports' layout; bumped when a key changes meaning or goes away.
SCHEMA = 1


def _silence(stream: TextIO) -> None:
    """After EPIPE: point the stream's fd at /dev/null so the exit-time flush cannot fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def emit(text: str, stream: Optional[TextIO] = None) -> bool:
    """Write ``text`` (a newline added) and flush; False if the reader has gone."""
    out = sys.stdout if stream is None else stream
    try:
        out.write(text + "\n")
        out.flush()
    except BrokenPipeError:
        _silence(out)
        return False
    except (OSError, ValueError):
        return False
    return True


def write_atomically(path: str, text: str) -> None:
    """``path`` holds either its old content or all of ``text``, never a part of it."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ralph-reaper-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def deliver(target: Optional[str], record: dict[str, Any], *, lines: bool = False) -> bool:
    """Send a JSON record to stderr (``""``), stdout (``"-"``) or a file; False on failure."""
    if target is None:
        return True
    text = json.dumps(record, sort_keys=True)
    if target == "":
        return emit(text, sys.stderr)
    if target == "-":
        return emit(text, sys.stdout)
    try:
        if lines:
            with open(target, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        else:
            write_atomically(target, text + "\n")
    except OSError as exc:
        emit(f"ralph-reaper: cannot write {target}: {exc.strerror or exc}", sys.stderr)
        return False
    return True


def run_record(
    result: DispatchCompletionResult,
    *,
    command: Optional[list[str]],
    exit_status: int,
    exit_signal: Optional[int],
    launched: bool,
    timeout_s: float,
    kill_after_s: float,
    stop_signal: int,
    received: list[int],
    forwarded: list[int],
) -> dict[str, Any]:
    """The JSON report of ``run``: the result as every face gives it, and what ``run`` did."""
    record = result.to_dict()
    record.update(
        schema=SCHEMA,
        version=__version__,
        command=command,
        launched=launched,
        exit_status=exit_status,
        exit_signal=exit_signal,
        timeout_s=timeout_s or None,
        kill_after_s=kill_after_s,
        stop_signal=_name(stop_signal),
        received_signals=[_name(s) for s in received],
        forwarded_signals=[_name(s) for s in forwarded],
    )
    return record


def _name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def describe(result: DispatchCompletionResult, command: str) -> str:
    """The one report line: what ended the command, how, and what else was stopped."""
    seconds = result.duration_ms / 1000.0
    if result.signal is not None:
        how = f"killed by {_name(result.signal)}"
        if result.core_dumped:
            how += " (core dumped)"
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


def noteworthy(result: DispatchCompletionResult) -> bool:
    """Whether ``run`` speaks without ``-v``: only when something happened besides an exit."""
    return (
        result.timed_out
        or result.stop_reason is not None
        or result.termination_method not in ("natural", "")
        or result.descendants_killed > 0
        or result.core_dumped
        or (result.return_code is None and result.signal is None)
    )
