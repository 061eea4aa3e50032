"""Cancelling an asyncio wait once a stop has begun: the stop still runs to its end.

A task awaiting :func:`ralph_reaper.aio.wait_for_dispatch_completion` may be
cancelled at any point (the loop's own timeout, a shutdown). Before any stop,
nothing is signalled (see test_aio.py). Once a stop has begun, of a timeout or
of what an exited leader left in its session, abandoning it would leave the
tree half-signalled, its pins open and the dispatch (with its stdin pipe)
registered for good. The stop is finished on a thread of its own instead, with
its own timers: these tests cancel in the middle of a grace period and then
check that the tree is gone and nothing is held.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

import procs
from ralph_reaper import DispatchResult, aio, spawn_dispatch, wait_for_dispatch_completion
from ralph_reaper.dispatches import REGISTRY

#: The tree's stubborn member: notes its pid, ignores SIGTERM (writing a mark
#: when it gets it), says it is ready, and runs until the stop's SIGKILL.
STUBBORN = """\
echo $$ > "$1/pid"
trap 'echo term > "$1/term"' TERM
touch "$1/ready"
while :; do sleep 0.05; done
"""
GRACE_MS = 400.0


def _stop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ralph-reaper-stop"]


def _cancel_once_termed(tmp_path: Path, argv: list[str], **options: float) -> int:
    """Start ``argv``, await it, cancel the await once the stubborn member got SIGTERM."""
    dispatch = spawn_dispatch(argv, ticket_id="pt-1", stdin="pipe")
    assert dispatch.status == "launched", dispatch.error
    assert dispatch.pid is not None

    async def main() -> None:
        task = asyncio.ensure_future(
            aio.wait_for_dispatch_completion(
                dispatch, "pt-1", graceful_shutdown_ms=GRACE_MS, eof_wait_ms=0, **options
            )
        )
        for _ in range(3000):  # set-up only: until the stop's SIGTERM has landed
            if (tmp_path / "term").exists() or task.done():
                break
            await asyncio.sleep(0.01)
        assert (tmp_path / "term").exists(), "the stop never sent SIGTERM"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return dispatch.pid


def _assert_all_gone(tmp_path: Path, leader: int) -> None:
    member = int((tmp_path / "pid").read_text())
    assert procs.wait_until(lambda: not _stop_threads(), timeout=30), "the stop never ended"
    assert procs.wait_until(lambda: procs.state(member) is None), procs.state(member)
    assert procs.state(leader) is None, procs.state(leader)
    assert REGISTRY.get(leader) is None, "the dispatch is still registered"


@pytest.mark.timeout(60)
def test_cancel_during_a_timeout_stop(backend: str, tmp_path: Path) -> None:
    script = tmp_path / "stubborn.sh"
    script.write_text(STUBBORN)
    leader = _cancel_once_termed(
        tmp_path, ["/bin/sh", str(script), str(tmp_path)], timeout_ms=100.0
    )
    _assert_all_gone(tmp_path, leader)


@pytest.mark.timeout(60)
def test_cancel_during_the_stop_of_what_the_leader_left(backend: str, tmp_path: Path) -> None:
    script = tmp_path / "stubborn.sh"
    script.write_text(STUBBORN)
    # The leader exits once the member's trap is set, so the sweep finds it ready.
    ready = tmp_path / "ready"
    leftover = f"/bin/sh {script} {tmp_path} & while [ ! -e {ready} ]; do sleep 0.01; done"
    leader = _cancel_once_termed(tmp_path, ["/bin/sh", "-c", leftover])
    if REGISTRY.get(leader) is not None and REGISTRY.get(leader).keeper is not None:  # type: ignore[union-attr]
        # Under a keeper the keeper itself stops what the command left: for this
        # process the cancel came while it waited, which leaves the dispatch to
        # a later wait. That wait must find the tree gone.
        result = wait_for_dispatch_completion(
            DispatchResult("s", "pt-1", "launched", leader), "pt-1"
        )
        assert result.descendants_killed >= 1, result
    _assert_all_gone(tmp_path, leader)
    assert os.path.exists(tmp_path / "term")
