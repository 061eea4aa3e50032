"""Input checks shared by every entry point.

Bad input must fail loudly before anything is signalled or written: a pid of
``0``, ``-1`` or ``True`` handed to ``kill``/``waitpid`` would address whole
process groups or the wrong process, which is exactly the class of bug this
package exists to remove.
"""

from __future__ import annotations

import math
import os

from .backends.procfs import proc_stat, stat_fields

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


_ancestry: tuple[int, frozenset[int]] = (0, frozenset())


def _walk_ancestry() -> frozenset[int]:
    out = {0, 1}
    pid = os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            st = proc_stat(pid)
        except OSError:  # cannot read /proc now: what was found is still a superset
            break
        if st is None:
            break
        pid = st.ppid
    return frozenset(out)


def ancestry() -> frozenset[int]:
    """This process and its ancestors (0 and 1 included), as last seen.

    A superset of the live ancestry: ancestors can only go away (an orphan is
    reparented to an ancestor or to init), never appear. It can hold a dead
    ancestor's pid, since reused by an unrelated process: ask
    :func:`is_ancestor`, which checks again before it says yes.
    """
    global _ancestry
    me = os.getpid()
    if _ancestry[0] != me:
        _ancestry = (me, _walk_ancestry())
    return _ancestry[1]


def is_ancestor(pid: int) -> bool:
    """True if ``pid`` is this process, an ancestor of it, 0 or 1, right now.

    The cached answer is only a filter: a hit is checked against a fresh walk
    of /proc, so that a long-running host whose parent (or grandparent) has
    exited still stops a dispatch that happens to get that recycled pid.
    """
    global _ancestry
    if pid not in ancestry():
        return False
    _ancestry = (os.getpid(), _walk_ancestry())
    return pid in _ancestry[1]


#: ``PF_KTHREAD`` in the flags field of ``/proc/<pid>/stat``.
PF_KTHREAD = 0x00200000


def is_kernel_thread(pid: int) -> bool:
    """True for a kernel thread (kthreadd, pid 2, and its children): never a dispatch."""
    fields = stat_fields(pid)
    return fields is not None and len(fields) > 6 and bool(int(fields[6]) & PF_KTHREAD)


def check_signal_target(pid: object) -> int:
    """Like :func:`check_pid`, and also refuse init, kthreadd and kernel threads,
    this process, its ancestors, and the leaders of its own process group and
    session: stopping any of them would stop the caller's own group or session
    (or, for pid 2, walk the kernel's own threads)."""
    value = check_pid(pid)
    if value == 1:
        raise ValueError("refusing to stop pid 1 (init)")
    if value == 2 or is_kernel_thread(value):
        raise ValueError(f"refusing to stop pid {value}: it is a kernel thread")
    if value == os.getpid():
        raise ValueError(f"refusing to stop pid {value}: it is this process")
    if value in (os.getpgid(0), os.getsid(0)):
        raise ValueError(f"refusing to stop pid {value}: it leads this process's group or session")
    if is_ancestor(value):
        raise ValueError(f"refusing to stop pid {value}: it is an ancestor of this process")
    return value


def _finite_ms(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of milliseconds, not {value!r}")
    fvalue = float(value)
    if math.isnan(fvalue) or math.isinf(fvalue):
        raise ValueError(f"{name} must be a finite number of milliseconds, not {value!r}")
    return fvalue


def check_ms(name: str, value: object) -> float:
    """A duration in milliseconds: a finite real number >= 0.

    For the package's own durations, which have no upstream meaning to keep:
    a negative one is a mistake worth hearing about.
    """
    fvalue = _finite_ms(name, value)
    if fvalue < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    return fvalue


def check_upstream_ms(name: str, value: object) -> float:
    """A duration ``tf.ralph_completion`` took: any finite number, a negative one read as 0.

    Upstream compared elapsed time against it (``timeout_ms <= 0``: no
    timeout) or waited "up to" it (a negative wait: no wait), and loops pass
    ``-1`` for "not configured"; refusing it would crash them on the swap.
    NaN, infinities and non-numbers never meant anything there: they still raise.
    """
    return max(0.0, _finite_ms(name, value))
