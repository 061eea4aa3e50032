"""The stop sequence as a plan with no I/O: stages, deadlines, rounds, and what each event does.

Every face (the blocking API, the monitor thread, asyncio, the command line)
stops a dispatch the same way because they all drive this one object. It
never reads a clock, opens a file or sends a signal: a driver feeds it events
with the time they happened and carries out the actions it returns. That is
what lets it be tested with a fake clock and no processes, and what keeps the
faces from drifting apart.

Stages, in order, each bounded by a deadline:

``eof``
    only where the package holds the dispatch's stdin: close it (or type ^D
    on its pty) and wait; nothing is signalled.
``sigterm``
    the first signal (SIGTERM unless the caller chose another) followed by
    SIGCONT, so that a stopped member can act on it; wait the grace.
``sigkill``
    SIGKILL, then wait at most ``kill_wait_s``; a process that survives it
    (uninterruptible sleep) makes the plan give up: method ``failed``.

Whenever every awaited member has exited, the driver is asked to discover
again (a member may have forked meanwhile). New members get the current
stage's signal and the stage goes on under the same deadline; after
``rounds`` such rounds in one stage the plan moves on (a tree that forks as
fast as it is stopped must not hold a stage for ever), and in the last stage
it gives up.

The search that SIGKILL needs is made ahead of it: with ``kill_lead_s`` set,
the ``sigterm`` stage first runs to ``kill_lead_s`` before its deadline, where
the driver searches and pins new members without signalling anyone
(``Presearch``), then to its deadline, where SIGKILL goes to what is pinned
without a search of its own. SIGKILL then leaves at its deadline instead of a
search later (a search after a long sleep runs on cold caches), and a member
forked in between is found by the next round as any other.

The method reported is the stage that actually ended the *leader*: ``eof``
only if it exited by itself after EOF, before any signal was sent.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Optional, Union

EOF, TERM, KILL = "eof", "sigterm", "sigkill"
#: How long SIGKILL may take before the plan gives up.
KILL_WAIT_S = 2.0
#: How long before SIGKILL the stops of this process search for it (``kill_lead_s``):
#: more than a search and the Python around it take on cold caches.
KILL_LEAD_S = 0.002
#: Discovery rounds per stage (members forked while the stage settles).
ROUNDS = 5
#: How long the EOF stage waits unless the caller says otherwise.
DEFAULT_EOF_WAIT_MS = 1000.0


@dataclass(frozen=True)
class SendEof:
    """Close the dispatch's stdin (or type ^D on its pty)."""


@dataclass(frozen=True)
class Signal:
    """Discover and pin new members, then send ``signals`` to every live pinned one
    (``search`` False: a ``Presearch`` just did the discovering)."""

    signals: tuple[int, ...]
    search: bool = True


@dataclass(frozen=True)
class Discover:
    """Discover and pin new members, then report ``found(now, n)`` with how many live ones."""


@dataclass(frozen=True)
class Presearch:
    """Discover and pin new members, signalling nobody: the search of the SIGKILL
    stage to come (see the module docstring); report nothing back."""


@dataclass(frozen=True)
class WaitUntil:
    """Await the exits of the live members until ``deadline`` (then report ``due``)."""

    deadline: float


@dataclass(frozen=True)
class Finish:
    """The sequence is over: ``success`` says whether nothing survived."""

    success: bool


Action = Union[SendEof, Signal, Discover, Presearch, WaitUntil, Finish]


@dataclass
class StopPlan:
    """One stop sequence; see the module docstring."""

    eof_wait_s: float = 0.0
    term_wait_s: float = 5.0
    kill_wait_s: float = KILL_WAIT_S
    rounds: int = ROUNDS
    first_signal: int = int(signal.SIGTERM)
    #: Start with EOF: the driver holds the dispatch's stdin.
    eof: bool = False
    #: How long before SIGKILL its search is made (0: at SIGKILL, by its ``Signal``).
    kill_lead_s: float = 0.0
    stage: str = ""
    deadline: float = 0.0
    done: bool = False
    success: bool = False
    stage_ms: dict[str, float] = field(default_factory=dict)
    #: The stage during which the leader's exit was seen (None: not yet).
    leader_stage: Optional[str] = None
    _t0: float = 0.0
    _round: int = 0
    _sent: set[str] = field(default_factory=set)
    #: The ``sigterm`` stage's own deadline while ``deadline`` is its presearch's.
    _kill_at: Optional[float] = None
    #: When the presearch was asked for (None: none since the stage began).
    _presearched: Optional[float] = None

    # ---------------------------------------------------------------- events

    def start(self, now: float) -> list[Action]:
        """Begin the sequence."""
        if self.eof and self.eof_wait_s > 0:
            return self._enter(EOF, now)
        return self._enter(TERM, now)

    def all_exited(self, now: float) -> list[Action]:
        """Every awaited member has exited: look for members forked meanwhile."""
        if self.done:
            return []
        return [Discover()]

    def found(self, now: float, live: int) -> list[Action]:
        """The answer to ``Discover``: how many live members are pinned now."""
        if self.done:
            return []
        if live == 0:
            self._end_stage(now)
            return self._finish(True)
        self._round += 1
        if self._round > self.rounds:
            self._kill_at = None  # moving on now: no search ahead of it
            return self.due(now)
        again: list[Action] = [] if self.stage == EOF else [self._signal_for(self.stage)]
        return [*again, WaitUntil(self.deadline)]

    def due(self, now: float) -> list[Action]:
        """The current stage's deadline passed (or its rounds ran out): escalate."""
        if self.done:
            return []
        kill_at, self._kill_at = self._kill_at, None
        if kill_at is not None and self.deadline <= now < kill_at:
            # The presearch's deadline: the search ahead of SIGKILL, then SIGKILL. (Before
            # it the caller skips the rest of the grace, after SIGKILL's it is late: both
            # escalate now.)
            self.deadline = kill_at
            self._presearched = now
            return [Presearch(), WaitUntil(kill_at)]
        self._end_stage(now)
        if self.stage == EOF:
            return self._enter(TERM, now)
        if self.stage == TERM:
            return self._enter(KILL, now)
        return self._finish(False)

    def leader_exited(self) -> None:
        """The leader's exit was seen (during the current stage)."""
        if self.leader_stage is None:
            self.leader_stage = self.stage

    # ---------------------------------------------------------------- answers

    def method(self, leader_signal: Optional[int]) -> str:
        """The stage that ended the leader, by what the kernel says killed it.

        A leader whose exit was seen during the SIGKILL stage but that was not
        killed by SIGKILL was already on its way out after the first signal.
        """
        if not self.success:
            return "failed"
        stage = self.leader_stage or self.stage
        if stage == KILL and leader_signal != signal.SIGKILL:
            stage = TERM if TERM in self._sent else EOF
        return stage

    # ---------------------------------------------------------------- internals

    def _signal_for(self, stage: str) -> Signal:
        if stage == KILL:
            return Signal((int(signal.SIGKILL),))
        if self.first_signal == signal.SIGKILL:
            return Signal((int(signal.SIGKILL),))
        return Signal((self.first_signal, int(signal.SIGCONT)))

    def _enter(self, stage: str, now: float) -> list[Action]:
        self.stage = stage
        self._t0 = now
        self._round = 0
        self._sent.add(stage)
        wait = {EOF: self.eof_wait_s, TERM: self.term_wait_s, KILL: self.kill_wait_s}[stage]
        self.deadline = now + wait
        # A presearch is as good as a search of SIGKILL's own unless the driver came
        # to SIGKILL late (more than the lead after its deadline): then it searches.
        fresh = self._presearched is not None and now - self._presearched <= 2 * self.kill_lead_s
        self._kill_at = self._presearched = None
        if stage == TERM and 0 < 2 * self.kill_lead_s < wait:
            self._kill_at, self.deadline = self.deadline, self.deadline - self.kill_lead_s
        first: Action
        if stage == EOF:
            first = SendEof()
        elif stage == KILL and fresh:
            first = Signal((int(signal.SIGKILL),), search=False)
        else:
            first = self._signal_for(stage)
        return [first, WaitUntil(self.deadline)]

    def _end_stage(self, now: float) -> None:
        self.stage_ms[self.stage] = (now - self._t0) * 1000.0

    def _finish(self, success: bool) -> list[Action]:
        self.done = True
        self.success = success
        return [Finish(success)]
