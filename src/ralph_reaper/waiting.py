"""Waiting for pinned processes to exit: event-driven on pidfds, backoff otherwise.

Pins with a pidfd are waited on by the kernel (poll or an epoll set), so a wait
returns as soon as the exit happens. Pins without one (polling backend, or
degraded after EMFILE) are checked with a backoff from 0.1 ms doubling to a
cap, so short-lived processes are still noticed quickly without spinning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional

from .backends.base import ExitStatus
from .pins import Pin

FIRST_STEP_S = 0.0001
MAX_STEP_S = 0.05


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


def wait_any(
    pins: Sequence[Pin], timeout_s: Optional[float], max_step_s: float = MAX_STEP_S
) -> list[Pin]:
    """Wait until at least one pin has exited or the timeout passes; return the exited."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    step = FIRST_STEP_S
    while True:
        done = [p for p in pins if p.status is not None]
        fd_pins = {p.fd: p for p in pins if p.fd >= 0 and p.status is None}
        slow = [p for p in pins if p.fd < 0 and p.status is None]
        done.extend(p for p in slow if p.exited())
        if done:
            return done
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0.0:
            return []
        wait_s = remaining
        if slow:
            wait_s = step if remaining is None else min(step, remaining)
            step = min(step * 2, max_step_s)
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
    reported (their statuses land in ``Pin.status``).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    by_token: dict[int, Pin] = {}
    slow: list[Pin] = []
    for pin in pins:
        if pin.status is not None:
            continue
        if pin.fd >= 0:
            by_token[len(by_token)] = pin
        else:
            slow.append(pin)
    epset = None
    if by_token:
        backend = next(iter(by_token.values())).backend
        epset = backend.epoll_set()
        for token, pin in by_token.items():
            epset.add(pin.fd, token)
    step = FIRST_STEP_S
    try:
        while True:
            slow = [p for p in slow if not p.exited()]
            if not by_token and not slow:
                return []
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0.0:
                return list(by_token.values()) + slow
            wait_s = remaining
            if slow:
                wait_s = step if remaining is None else min(step, remaining)
                step = min(step * 2, max_step_s)
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
