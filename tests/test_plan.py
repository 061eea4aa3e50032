"""The stop plan on its own: a fake clock, no processes, every path of the sequence.

The plan has no I/O, so these tests feed it events with made-up times and
check the actions it asks for; the conformance suite checks that every face
carries them out the same way on real process trees.
"""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ralph_reaper.plan import (
    EOF,
    KILL,
    TERM,
    Action,
    Discover,
    Finish,
    Presearch,
    SendEof,
    Signal,
    StopPlan,
    WaitUntil,
)

TERM_CONT = Signal((int(signal.SIGTERM), int(signal.SIGCONT)))
KILL_ONLY = Signal((int(signal.SIGKILL),))


def test_cooperative_tree_ends_in_sigterm() -> None:
    plan = StopPlan(term_wait_s=5.0)
    assert plan.start(100.0) == [TERM_CONT, WaitUntil(105.0)]
    assert plan.all_exited(100.2) == [Discover()]
    plan.leader_exited()
    assert plan.found(100.2, 0) == [Finish(True)]
    assert plan.done and plan.success
    assert plan.method(signal.SIGTERM) == TERM
    assert plan.stage_ms == pytest.approx({TERM: 200.0})


def test_eof_first_when_stdin_is_held_and_the_leader_ends_by_itself() -> None:
    plan = StopPlan(eof=True, eof_wait_s=1.0, term_wait_s=5.0)
    assert plan.start(0.0) == [SendEof(), WaitUntil(1.0)]
    plan.leader_exited()
    plan.all_exited(0.3)
    assert plan.found(0.3, 0) == [Finish(True)]
    assert plan.method(None) == EOF
    assert list(plan.stage_ms) == [EOF]  # a stage is listed only if it ran


def test_no_eof_stage_without_a_wait() -> None:
    plan = StopPlan(eof=True, eof_wait_s=0.0)
    assert plan.start(0.0)[0] == TERM_CONT


def test_escalation_eof_term_kill_then_give_up() -> None:
    plan = StopPlan(eof=True, eof_wait_s=1.0, term_wait_s=2.0, kill_wait_s=2.0)
    plan.start(0.0)
    assert plan.due(1.0) == [TERM_CONT, WaitUntil(3.0)]
    assert plan.due(3.0) == [KILL_ONLY, WaitUntil(5.0)]
    assert plan.due(5.0) == [Finish(False)]
    assert plan.method(None) == "failed"
    assert plan.stage_ms == pytest.approx({EOF: 1000.0, TERM: 2000.0, KILL: 2000.0})


def test_term_ignoring_leader_is_reported_as_sigkill() -> None:
    plan = StopPlan(term_wait_s=1.0)
    plan.start(0.0)
    plan.due(1.0)
    plan.leader_exited()
    plan.all_exited(1.001)
    plan.found(1.001, 0)
    assert plan.method(signal.SIGKILL) == KILL


def test_leader_seen_in_kill_stage_but_ended_by_term_is_sigterm() -> None:
    # Its exit was noticed just after SIGKILL went out, but SIGTERM is what ended it.
    plan = StopPlan(term_wait_s=1.0)
    plan.start(0.0)
    plan.due(1.0)
    plan.leader_exited()
    plan.all_exited(1.0)
    plan.found(1.0, 0)
    assert plan.method(signal.SIGTERM) == TERM


def test_members_forked_meanwhile_get_the_stage_signal_under_the_same_deadline() -> None:
    plan = StopPlan(term_wait_s=5.0)
    plan.start(0.0)
    plan.all_exited(1.0)
    assert plan.found(1.0, 2) == [TERM_CONT, WaitUntil(5.0)]
    plan.all_exited(2.0)
    assert plan.found(2.0, 0) == [Finish(True)]


def test_a_tree_that_forks_for_ever_moves_on_after_the_rounds() -> None:
    plan = StopPlan(term_wait_s=5.0, rounds=3)
    plan.start(0.0)
    for i in range(3):
        plan.all_exited(0.1 * (i + 1))
        assert plan.found(0.1 * (i + 1), 1) == [TERM_CONT, WaitUntil(5.0)]
    plan.all_exited(0.4)
    assert plan.found(0.4, 1) == [KILL_ONLY, WaitUntil(0.4 + plan.kill_wait_s)]
    for i in range(3):
        plan.all_exited(0.5 + i)
        assert plan.found(0.5 + i, 1) == [KILL_ONLY, WaitUntil(0.4 + plan.kill_wait_s)]
    plan.all_exited(3.0)
    assert plan.found(3.0, 1) == [Finish(False)]


KILL_SEARCHED = Signal((int(signal.SIGKILL),), search=False)


def test_sigkill_is_searched_for_ahead_of_its_deadline() -> None:
    # The search SIGKILL needs runs kill_lead_s early and signals nobody; SIGKILL
    # then goes out at the stage's own deadline without a search of its own.
    plan = StopPlan(term_wait_s=5.0, kill_wait_s=2.0, kill_lead_s=0.01)
    assert plan.start(0.0) == [TERM_CONT, WaitUntil(4.99)]
    assert plan.due(4.99) == [Presearch(), WaitUntil(5.0)]
    assert plan.due(5.0) == [KILL_SEARCHED, WaitUntil(7.0)]
    assert plan.stage_ms == pytest.approx({TERM: 5000.0})  # the stage ran its full grace
    plan.leader_exited()
    plan.all_exited(5.001)
    assert plan.found(5.001, 0) == [Finish(True)]
    assert plan.method(signal.SIGKILL) == KILL


def test_a_late_sigkill_searches_again() -> None:
    # The driver came to SIGKILL more than the lead after its deadline: what the
    # presearch found may be stale, so the signal searches first.
    plan = StopPlan(term_wait_s=5.0, kill_lead_s=0.01)
    plan.start(0.0)
    plan.due(4.99)
    assert plan.due(5.5)[0] == KILL_ONLY


def test_skipping_the_grace_or_coming_late_escalates_at_once() -> None:
    # A terminate() during the grace asks for SIGKILL now, not for a presearch; a
    # driver that comes after SIGKILL's own deadline sends it now, searching first.
    for now in (1.0, 5.5):
        plan = StopPlan(term_wait_s=5.0, kill_wait_s=2.0, kill_lead_s=0.01)
        plan.start(0.0)
        assert plan.due(now) == [KILL_ONLY, WaitUntil(now + 2.0)]


def test_no_presearch_when_the_grace_is_short_or_no_lead_is_asked() -> None:
    assert StopPlan(term_wait_s=0.015, kill_lead_s=0.01).start(0.0)[1] == WaitUntil(0.015)
    plan = StopPlan(term_wait_s=5.0)
    assert plan.start(0.0)[1] == WaitUntil(5.0)
    assert plan.due(5.0)[0] == KILL_ONLY


def test_the_stage_settling_before_the_presearch_ends_as_before() -> None:
    plan = StopPlan(term_wait_s=5.0, kill_lead_s=0.01)
    plan.start(0.0)
    plan.all_exited(1.0)
    assert plan.found(1.0, 1) == [TERM_CONT, WaitUntil(4.99)]  # forked meanwhile
    plan.all_exited(2.0)
    assert plan.found(2.0, 0) == [Finish(True)]
    assert plan.method(signal.SIGTERM) == TERM


def test_rounds_run_out_before_the_presearch_move_on_at_once() -> None:
    plan = StopPlan(term_wait_s=5.0, rounds=1, kill_lead_s=0.01)
    plan.start(0.0)
    plan.all_exited(0.1)
    plan.found(0.1, 1)
    plan.all_exited(0.2)
    assert plan.found(0.2, 1) == [KILL_ONLY, WaitUntil(0.2 + plan.kill_wait_s)]


def test_new_members_during_eof_are_only_awaited() -> None:
    plan = StopPlan(eof=True, eof_wait_s=1.0)
    plan.start(0.0)
    plan.all_exited(0.1)
    assert plan.found(0.1, 1) == [WaitUntil(1.0)]


def test_first_signal_can_be_chosen() -> None:
    plan = StopPlan(first_signal=int(signal.SIGINT))
    assert plan.start(0.0)[0] == Signal((int(signal.SIGINT), int(signal.SIGCONT)))
    assert StopPlan(first_signal=int(signal.SIGKILL)).start(0.0)[0] == KILL_ONLY


def test_events_after_the_end_do_nothing() -> None:
    plan = StopPlan()
    plan.start(0.0)
    plan.all_exited(0.1)
    plan.found(0.1, 0)
    assert plan.due(10.0) == plan.all_exited(10.0) == plan.found(10.0, 3) == []


Event = st.one_of(
    st.just(("due",)),
    st.just(("all_exited",)),
    st.tuples(st.just("found"), st.integers(0, 3)),
    st.just(("leader",)),
)


@given(
    eof=st.booleans(),
    events=st.lists(Event, max_size=40),
    waits=st.tuples(*[st.floats(0.0, 10.0)] * 3),
    lead=st.sampled_from([0.0, 0.002, 0.4, 3.0]),
)
def test_any_event_order_keeps_the_plan_sane(
    eof: bool, events: list[tuple[object, ...]], waits: tuple[float, float, float], lead: float
) -> None:
    """Whatever happens, stages only move forward, deadlines never go back in a stage,
    the sequence ends at most once, the method is always one of the known ones, and
    a presearch signals nobody and comes only in the sigterm stage."""
    plan = StopPlan(
        eof=eof,
        eof_wait_s=waits[0],
        term_wait_s=waits[1],
        kill_wait_s=waits[2],
        kill_lead_s=lead,
    )
    order = [EOF, TERM, KILL]
    now = 0.0
    actions: list[Action] = plan.start(now)
    finishes = sum(isinstance(a, Finish) for a in actions)
    for event in events:
        before = order.index(plan.stage)
        now += 0.5
        if event[0] == "due":
            actions = plan.due(now)
        elif event[0] == "all_exited":
            actions = plan.all_exited(now)
        elif event[0] == "found":
            count = event[1]
            assert isinstance(count, int)
            actions = plan.found(now, count)
        else:
            plan.leader_exited()
            actions = []
        finishes += sum(isinstance(a, Finish) for a in actions)
        if any(isinstance(a, Presearch) for a in actions):
            assert plan.stage == TERM and not any(isinstance(a, Signal) for a in actions)
        assert order.index(plan.stage) >= before
        for action in actions:
            if isinstance(action, WaitUntil):
                assert action.deadline == plan.deadline
    assert finishes <= 1
    assert finishes == int(plan.done)
    if plan.done:
        assert plan.method(None) in (EOF, TERM, KILL, "failed")
        assert set(plan.stage_ms) <= {EOF, TERM, KILL}
