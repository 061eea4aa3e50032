"""Every tree shape of the test matrix, through the public API, on every backend.

Each shape (tests/shapes.py) is started with ``spawn_dispatch``, under the
containment its backend uses: the keeper on the native backend (when it is
built), session containment on the others. The tree prints its pids into a
pipe given as the dispatch's stdout. Then the dispatch is stopped, either with
``graceful_terminate_dispatch`` or by ``wait_for_dispatch_completion`` running
out of time, and the test checks that nothing of the tree is left: no pid it
printed is in /proc (not even as a zombie), and the test process has no new
descendant. The test process is a child subreaper (conftest.py), so whatever a
dead member leaves, zombies of a never-reaping parent included, comes back to
it or to the keeper, and must have been reaped by the package or the keeper.

Session containment does not claim a daemon that detached with ``setsid``
after its parent exited (README, "Containment"): those shapes are asserted
under keeper containment only, and are never started under the other.

Waits have generous deadlines only to turn a hang into a failure; nothing
asserts on timing.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Optional

import pytest

from procs import alive, descendants_of, state, wait_until
from ralph_reaper import (
    DispatchCompletionStatus,
    graceful_terminate_dispatch,
    poll_dispatch_status,
    spawn_dispatch,
    wait_for_dispatch_completion,
)
from ralph_reaper.keeper_path import keeper_path
from shapes import SHAPES, WAIT_S, Lines, Member, Shape, assert_gone

TICKET = "pt-shape"
#: The SIGTERM grace of every stop (short: several shapes need SIGKILL).
KILL_WAIT_MS = 300
#: wait_for_dispatch_completion's timeout, counted from after the pids were read.
TIMEOUT_MS = 50
STOPPED_BY = ("sigterm", "sigkill")


def containment_for(backend: str) -> str:
    return "keeper" if backend == "native" and keeper_path() is not None else "session"


class Tree:
    """A dispatch whose stdout is a pipe this test reads the tree's pids from."""

    def __init__(self, shape: Shape) -> None:
        self.read_fd, write_fd = os.pipe()
        try:
            self.dispatch = spawn_dispatch(
                shape.cmd, ticket_id=TICKET, stdin="devnull", stdout=write_fd, env=shape.env
            )
        except BaseException:
            os.close(self.read_fd)
            raise
        finally:
            os.close(write_fd)  # the tree holds the only write ends now: EOF once it is gone
        assert self.dispatch.status == "launched", self.dispatch.error
        assert self.dispatch.pid is not None
        self.pid: int = self.dispatch.pid
        self.leader = Member(self.pid)  # the keeper, or the command itself
        self.lines = Lines(self.read_fd)

    def pids(self, n: int) -> list[Member]:
        """Read n pids the tree printed (one per line)."""
        out = []
        for _ in range(n):
            line = self.lines.readline()
            assert line is not None, "the tree closed stdout before printing its pids"
            out.append(Member(int(line)))
        return out

    def late(self) -> list[Member]:
        """Pids printed after the stop began (forked on SIGTERM), up to EOF."""
        return [Member(int(line)) for line in self.lines.rest() if line.strip()]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.read_fd)


@pytest.fixture
def trees() -> Iterator[list[Tree]]:
    started: list[Tree] = []
    yield started
    for tree in started:
        tree.close()


def new_descendants(before: set[int]) -> dict[int, Optional[str]]:
    """Processes below this one that were not there before the test (pid: state)."""
    return {p: state(p) for p in descendants_of(os.getpid()) if p not in before}


def check_killed(killed: int, shape: Shape, late: list[Member]) -> None:
    if shape.exact:
        assert killed == shape.killed
    else:
        assert killed >= shape.killed + len(late)


@pytest.mark.parametrize("stop", ["terminate", "timeout"])
@pytest.mark.parametrize("shape", SHAPES, ids=repr)
def test_nothing_of_the_tree_survives(
    backend: str, trees: list[Tree], shape: Shape, stop: str
) -> None:
    containment = containment_for(backend)
    if shape.detached and containment != "keeper":
        # Skipped before anything is started: such a daemon would escape the stop.
        pytest.skip(
            "session containment does not claim detached daemons (setsid after the parent "
            "exited leaves both the tree and the session): only a subreaper, the keeper, "
            "can catch them"
        )
    before = set(descendants_of(os.getpid()))
    tree = Tree(shape)
    trees.append(tree)
    members = tree.pids(shape.npids)

    if shape.leader_exits is not None:
        # The leader exits on its own; the dispatch ends when the keeper, or the
        # leader itself, has exited (not reaped: the package reaps it). Waiting
        # for that first makes both stop paths deterministic: terminate finds it
        # not running, and the wait's exit event wins over its short timeout.
        assert wait_until(lambda: not alive(tree.pid), WAIT_S)
        if containment == "session":
            # Nobody has stopped the leftovers yet: the API call below must.
            kids = [m for m in members if m.pid != tree.pid]
            assert kids and all(alive(m.pid) for m in kids)
        expected_rc = shape.leader_exits
    else:
        expected_rc = -signal.SIGTERM

    if stop == "terminate":
        ok, method = graceful_terminate_dispatch(tree.pid, kill_wait_ms=KILL_WAIT_MS)
    else:
        result = wait_for_dispatch_completion(
            tree.dispatch, TICKET, timeout_ms=TIMEOUT_MS, graceful_shutdown_ms=KILL_WAIT_MS
        )

    # Nothing survives, right after the call returned (no waiting).
    left = new_descendants(before)
    assert not left, f"left behind by the stop (pid: state): {left}"
    late = tree.late()
    assert_gone([tree.leader, *members, *late])

    if stop == "terminate":
        if shape.leader_exits is not None:
            assert (ok, method) == (True, "not_running")
        else:
            assert ok and method in STOPPED_BY
    else:
        assert result.pid == tree.pid
        assert result.containment == containment
        assert result.return_code == expected_rc
        if shape.leader_exits is not None:
            assert result.status is DispatchCompletionStatus.ERROR
            assert result.termination_method == "natural"
            assert result.stop_reason is None and not result.timed_out
        else:
            assert result.status is DispatchCompletionStatus.TIMEOUT
            assert result.stop_reason == "timeout" and result.timed_out
            assert result.termination_method in STOPPED_BY
            assert result.signal == signal.SIGTERM
        check_killed(result.descendants_killed, shape, late)
    # The dispatch's own exit was collected and is remembered.
    assert poll_dispatch_status(tree.pid) == (False, expected_rc)
