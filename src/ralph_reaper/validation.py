"""Input checks shared by every entry point.

Bad input must fail loudly before anything is signalled or written: a pid of
``0``, ``-1`` or ``True`` handed to ``kill``/``waitpid`` would address whole
process groups or the wrong process, which is exactly the class of bug this
package exists to remove.
"""

from __future__ import annotations

import math
import os

#: PID_MAX_LIMIT on 64-bit Linux; no pid can be larger.
PID_LIMIT = 4 * 1024 * 1024


def check_pid(pid: object) -> int:
    """Return ``pid`` if it can name one process, else raise TypeError/ValueError."""
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise TypeError(f"pid must be an int, not {type(pid).__name__}: {pid!r}")
    if pid <= 0:
        raise ValueError(f"pid must be > 0 (got {pid}); 0 and negative pids address groups")
    if pid > PID_LIMIT:
        raise ValueError(f"pid {pid} is out of range (the kernel's limit is {PID_LIMIT})")
    return int(pid)


def check_signal_target(pid: object) -> int:
    """Like :func:`check_pid`, and also refuse init and this very process."""
    value = check_pid(pid)
    if value == 1:
        raise ValueError("refusing to stop pid 1 (init)")
    if value == os.getpid():
        raise ValueError(f"refusing to stop pid {value}: it is this process")
    return value


def check_ms(name: str, value: object) -> float:
    """A duration in milliseconds: a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of milliseconds, not {value!r}")
    fvalue = float(value)
    if math.isnan(fvalue) or math.isinf(fvalue) or fvalue < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    return fvalue
