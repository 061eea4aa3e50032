"""A loop written against ralph-reaper's types, checked by ``mypy --strict``.

``tests/test_typing.py`` type-checks this file and runs it. The lines marked
``# type: ignore[...]`` are mistakes a strict checker must catch: with
``warn_unused_ignores`` (part of ``--strict``), an ignore that is not needed
is itself an error, so if the types ever stopped catching one, the check fails.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Optional

import ralph_reaper
from ralph_reaper import (
    BackendInfo,
    DispatchCompletionResult,
    DispatchCompletionStatus,
    DispatchResult,
    StdinMode,
    spawn_dispatch,
    wait_for_dispatch_completion,
)


class RalphLogger:
    """The loop's own logger: a ``ticket=`` keyword, ``warn`` and no ``warning``."""

    def info(self, msg: str, ticket: Optional[str] = None) -> None:
        print(f"[{ticket}] {msg}", file=sys.stderr)

    def warn(self, msg: str, ticket: Optional[str] = None) -> None:
        print(f"[{ticket}] warning: {msg}", file=sys.stderr)

    def error(self, msg: str, ticket: Optional[str] = None) -> None:
        print(f"[{ticket}] error: {msg}", file=sys.stderr)


def launch(ticket: str) -> DispatchResult:
    """The launcher of the loop: ``subprocess.Popen`` swapped for ``ralph_reaper.Popen``."""
    proc = ralph_reaper.Popen(
        ["/bin/sh", "-c", "echo $0 done", ticket],
        grace_ms=2000,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    binary: ralph_reaper.Popen[bytes] = proc  # bytes mode, inferred from the arguments
    assert isinstance(binary, subprocess.Popen)
    return DispatchResult(f"s-{ticket}", ticket, "launched", proc.pid)


def text_mode() -> str:
    with ralph_reaper.Popen(["/bin/sh", "-c", "echo hi"], stdout=subprocess.PIPE, text=True) as p:
        out: str = p.communicate()[0]  # str in text mode
    return out


def finish(dispatch: DispatchResult, logger: RalphLogger) -> DispatchCompletionResult:
    # -1 is "no timeout", as upstream; the logger fits LoggerLike.
    return wait_for_dispatch_completion(dispatch, dispatch.ticket_id, -1, logger=logger)


def spawned(mode: StdinMode = "devnull") -> DispatchCompletionResult:
    d = spawn_dispatch(["/bin/sh", "-c", "exit 0"], ticket_id="pt-2", stdin=mode)
    return wait_for_dispatch_completion(d, "pt-2", logger=logging.getLogger("ralph"))


def mistakes_a_strict_checker_catches() -> None:
    """Never called: each line is a mistake that must not type-check."""
    spawn_dispatch(["true"], ticket_id="pt-3", stdin="pipes")  # type: ignore[arg-type]
    wait_for_dispatch_completion(12345, "pt-3")  # type: ignore[arg-type]
    wait_for_dispatch_completion(launch("pt-3"), "pt-3", logger="ralph")  # type: ignore[arg-type]
    info: BackendInfo = ralph_reaper.backend_info()
    info["backends"]  # type: ignore[typeddict-item]
    ralph_reaper.Popen(["true"]).terminate(grace_ms="5s")  # type: ignore[arg-type]


def main() -> None:
    info: BackendInfo = ralph_reaper.backend_info()
    backend: str = info["backend"]
    pidfd: bool = info["features"]["pidfd"]
    result = finish(launch("pt-1"), RalphLogger())
    assert result.status is DispatchCompletionStatus.COMPLETED, result
    assert text_mode() == "hi\n"
    assert spawned().status is DispatchCompletionStatus.COMPLETED
    print(backend, pidfd, result.containment)


if __name__ == "__main__":
    main()
