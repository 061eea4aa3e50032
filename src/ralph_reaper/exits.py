"""What the package remembers between calls about processes it has seen.

Two bounded tables, shared by every entry point and guarded by one lock:

* the exits it collected, so a second ``poll_dispatch_status`` of a reaped
  child gives the same code instead of ``(False, None)``, until a new live
  process is seen with that pid;
* the pins it holds for live processes it was asked about, so that the exit
  of a process that is not our child can still be learned (``PIDFD_INFO_EXIT``)
  after its parent reaps it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

from .backends.base import Backend, ExitStatus
from .pins import Pin

MAX_EXITS = 4096
MAX_PINS = 256


class ExitBook:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exits: OrderedDict[int, tuple[int, ExitStatus]] = OrderedDict()
        self._pins: OrderedDict[int, Pin] = OrderedDict()

    def remember(self, pid: int, starttime: int, status: ExitStatus) -> None:
        with self._lock:
            self._exits[pid] = (starttime, status)
            self._exits.move_to_end(pid)
            while len(self._exits) > MAX_EXITS:
                self._exits.popitem(last=False)

    def lookup(self, backend: Backend, pid: int) -> Optional[ExitStatus]:
        """The remembered exit of ``pid``, unless a new process now has that pid."""
        with self._lock:
            entry = self._exits.get(pid)
        if entry is None:
            return None
        starttime, status = entry
        st = backend.proc_stat(pid)
        if st is not None and st.starttime != starttime:
            with self._lock:
                if self._exits.get(pid) is entry:
                    del self._exits[pid]
            return None
        return status

    def hold(self, pin: Pin) -> None:
        """Keep ``pin`` open for a later query of the same pid."""
        evicted: list[Pin] = []
        with self._lock:
            old = self._pins.pop(pin.pid, None)
            if old is not None and old is not pin:
                evicted.append(old)
            self._pins[pin.pid] = pin
            while len(self._pins) > MAX_PINS:
                evicted.append(self._pins.popitem(last=False)[1])
        for stale in evicted:
            stale.close()

    def drop_exited(self, pid: int) -> None:
        """Close a pin still held for ``pid`` once its process has exited.

        A poll that saw the process running holds its pin; if a concurrent
        call recorded the exit meanwhile, nothing would ever take that pin back.
        """
        with self._lock:
            pin = self._pins.get(pid)
            if pin is None or not pin.exited():
                return
            del self._pins[pid]
        pin.close()

    def take(self, pid: int) -> Optional[Pin]:
        with self._lock:
            return self._pins.pop(pid, None)

    def prune(self) -> int:
        """Close the held pins of processes that exited, keeping their statuses; return count."""
        with self._lock:
            pins = list(self._pins.values())
        closed = 0
        for pin in pins:
            if not pin.exited():
                continue
            status = pin.collect()
            with self._lock:
                if self._pins.get(pin.pid) is pin:
                    del self._pins[pin.pid]
                else:
                    continue
            if status is not None:
                self.remember(pin.pid, pin.starttime, status)
            pin.close()
            closed += 1
        return closed

    def clear(self) -> None:
        with self._lock:
            pins = list(self._pins.values())
            self._pins.clear()
            self._exits.clear()
        for pin in pins:
            pin.close()


BOOK = ExitBook()
