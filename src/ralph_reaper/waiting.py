"""Waiting for pinned processes to exit: event-driven on pidfds, polled otherwise.

Pins with a pidfd are waited on by the kernel (poll or an epoll set), so a wait
returns as soon as the exit happens. Pins without one (polling backend, or
degraded after EMFILE) are checked through :class:`~ralph_reaper.polled.Polled`:
one ``waitid`` peek for those that are our children, a backoff of their own for
the others, each from 0.1 ms doubling to a cap, so short-lived processes are
still noticed quickly without spinning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional

from .backends.base import ExitStatus
from .pins import Pin
from .polled import FIRST_STEP_S, MAX_STEP_S, Polled

__all__ = ["FIRST_STEP_S", "MAX_STEP_S", "poll_step_cap", "wait_all", "wait_any"]


def poll_step_cap(poll_interval_ms: object) -> float:
    """The longest backoff step of a polled wait, from upstream's ``poll_interval_ms``.

    Upstream slept that long between polls; here it only caps the backoff, and
    0 or less (upstream: no sleep) must not turn into a spin.
    """
    from .validation import check_upstream_ms

    asked_s = check_upstream_ms("poll_interval_ms", poll_interval_ms) / 1000.0
    return min(max(asked_s, FIRST_STEP_S), MAX_STEP_S)


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _polled(pins: Sequence[Pin], max_step_s: float) -> Polled[None]:
    polled: Polled[None] = Polled(max_step_s)
    now = time.monotonic()
    for pin in pins:
        if pin.fd < 0 and pin.status is None:
            polled.add(pin, None, now)
    return polled


def _sleep_s(polled: Polled[None], remaining: Optional[float]) -> Optional[float]:
    """How long to block: until the deadline, or the next polled check if sooner."""
    due = polled.next_due()
    if due is None:
        return remaining
    step = max(0.0, due - time.monotonic())
    return step if remaining is None else min(step, remaining)


def wait_any(
    pins: Sequence[Pin], timeout_s: Optional[float], max_step_s: float = MAX_STEP_S
) -> list[Pin]:
    """Wait until at least one pin has exited or the timeout passes; return the exited.

    Exited pins are not collected: the caller reaps (or not) as it sees fit.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    polled = _polled(pins, max_step_s)
    while True:
        remaining = _remaining(deadline)
        last = remaining is not None and remaining <= 0.0
        found, failed = polled.check(time.monotonic(), collect=False, last=last)
        if failed:
            raise failed[0][2]
        done = [p for p in pins if p.status is not None]
        done.extend(p for _owner, p in found if p.status is None)
        if done:
            return done
        if last:
            return []
        fd_pins = {p.fd: p for p in pins if p.fd >= 0 and p.status is None}
        wait_s = _sleep_s(polled, _remaining(deadline))
        if fd_pins:
            backend = next(iter(fd_pins.values())).backend
            ready = backend.wait_readable(list(fd_pins), wait_s)
            if ready:
                return [fd_pins[fd] for fd in ready]
        elif wait_s is not None:
            time.sleep(wait_s)
        else:  # pragma: no cover - wait_any([]) with no timeout would block for ever
            return []


def wait_all(
    pins: Sequence[Pin], timeout_s: Optional[float], max_step_s: float = MAX_STEP_S
) -> list[Pin]:
    """Wait until every pin has exited or the timeout passes; return those still running.

    Pins with a pidfd go into one epoll set, so the cost is one event per exit
    whatever the number of pins; exited children are reaped as they are
    reported (their statuses land in ``Pin.status``). Polled pins are only
    found exited, as before: their caller collects them.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    by_token: dict[int, Pin] = {}
    for pin in pins:
        if pin.status is None and pin.fd >= 0:
            by_token[len(by_token)] = pin
    polled = _polled(pins, max_step_s)
    epset = None
    if by_token:
        backend = next(iter(by_token.values())).backend
        epset = backend.epoll_set()
        for token, pin in by_token.items():
            epset.add(pin.fd, token)
    try:
        while True:
            remaining = _remaining(deadline)
            last = remaining is not None and remaining <= 0.0
            # Not collected: a stop reaps its leader only at the end, since the
            # unreaped leader is what keeps its process group safe to signal.
            _found, failed = polled.check(time.monotonic(), collect=False, last=last)
            if failed:
                raise failed[0][2]
            if not by_token and not len(polled):
                return []
            if last:
                return list(by_token.values()) + polled.pins()
            wait_s = _sleep_s(polled, _remaining(deadline))
            if epset is not None and by_token:
                for event in epset.drain(wait_s, 1024):
                    pin = by_token.pop(event.token)
                    known = None if event.status is None else ExitStatus(event.status, event.rusage)
                    pin.set_exit(known, event.reaped)
                    if pin.status is None and not event.reaped:
                        pin.collect()
            elif wait_s is not None:
                time.sleep(wait_s)
    finally:
        if epset is not None:
            epset.close()
