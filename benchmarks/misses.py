"""Why a target is missed, where we know: written under the targets table for the missed ones.

Keyed by the start of a target's ``what``; the first key that matches explains it.
The text says what costs, not how much: the figures are in the tables.
"""

from __future__ import annotations

from collections.abc import Sequence

from .scenarios import Target

WHY: list[tuple[str, str]] = [
    (
        "S1 polling",
        "Without pidfds an exit is found by polling, with a backoff from 0.1 ms to 50 ms: "
        "the latency is the phase of the poll at which the child exits.",
    ),
    (
        "S1 ",
        "The floor is a C loop blocked in waitid on one pid. A wait of ours pins the "
        "process (pidfd, ancestry), wakes from epoll, reaps with rusage and builds the "
        "result in Python, and with stop_leftovers searches the session for leftovers: "
        "this process's children file (it is a subreaper, from before the leader's "
        "birth, so nothing above it is read) and the stat of each child born since "
        "(see the stop_leftovers=False rows for the part that is). Python's own "
        "os.waitpid is already above the floor. After the wake-up that is a few hundred "
        "Python calls, and the child's 5 ms sleep leaves the caches cold: measured "
        "alone, the part after the wake-up takes about twice as long as when the same "
        "wait follows a 0.2 ms sleep. A wait path that returns the finished result from "
        "one C call was not built.",
    ),
    (
        "S2 N=",
        "Per exit the monitor runs Python: the pin's status, the result object, the "
        "future and its callbacks, on the same two cores as the children (wall), and "
        "that is most of its CPU per exit. The kernel's own share is already about the "
        "whole floor: the floor reaps with waitid(P_ALL) and holds nothing, while a "
        "watched exit is reaped through its pidfd, whose close then frees the pidfd's "
        "inode, and the reap flushes the /proc entries that pinning the process "
        "created (measured alone: about 8-10 us for the reap and 3 us for the close, "
        "against the floor's 4-8 us in all), so 2x the floor would leave Python a few "
        "microseconds per exit; one future's set_result is 2 us. Reaping is one C call "
        "per batch of exits (drain, waitid with rusage, removal from the set); the "
        "close of each pidfd and the result stay in Python.",
    ),
    (
        "S3 polling",
        "Without pidfds every watched pid is polled: the waitid gate for our children "
        "and a full check of each child pin about every second, each held to a quarter "
        "of a percent of a core once the rounds have backed off; the first rounds start "
        "at 0.1 ms and double, and they weigh most in a short window (quick mode).",
    ),
    (
        "S3 ",
        "An idle monitor waits in one epoll_wait with no timer due but its progress line; "
        "a miss is the machine's noise (see the load average) unless a quiet rerun "
        "repeats it.",
    ),
    (
        "S4 SIGTERM-ignoring",
        "Measured from the earliest moment SIGKILL may be sent: the session is searched "
        "for it 2 ms ahead (design section 5; ralph_reaper.plan, so that SIGKILL leaves "
        "at its deadline and not after a search on cold caches), the stop's timer ends "
        "at its deadline give or take the kernel's timer slack (ralph_reaper.backends."
        "deadlines; the keeper waits in ppoll the same way), then the exit is awaited "
        "and the session swept. Under a keeper the host asks the keeper, which stops the "
        "tree itself, reports, and exits; the host then reaps it. The floor row of the "
        "same table (a C kill() and a blocking "
        "waitid) is the kernel's own part: ending a SIGKILLed process takes it a good "
        "part of the 2 ms at p99 on a shared virtual machine, and the stdlib's and "
        "psutil's recipes land beside ours; a p99 of 30 runs moves with the machine.",
    ),
    (
        "S4 ",
        "A cooperative stop is EOF, then SIGTERM through a pidfd, one epoll wake-up, the "
        "reap and the session sweep in Python; a miss beside the other rows' p50 is the "
        "machine's noise in a p99 of 100 runs.",
    ),
    (
        "S5 native+keeper",
        "The keeper claims every daemon (zero survivors); the time is an absolute 100 ms "
        "over five runs of a 334-daemon fan, and it moves around the target with the "
        "machine (see the floor row's time in the same run): the keeper discovers, pins "
        "and signals each daemon, then waits for the kernel to end and reparent them.",
    ),
    (
        "S5 ",
        "Session containment cannot find daemons that left both the tree and the "
        "session (setsid after a double fork): only keeper containment claims them "
        "(design section 5), its row beside these.",
    ),
    (
        "S6 spawn_dispatch (native)",
        "Under keeper containment a spawn is two execs in series (the keeper, then the "
        "command from it), and the call returns only once the keeper reports that the "
        "command runs, so that a command that cannot start is a launch error at spawn "
        "time, as it is for Popen. The keeper is already static (no dynamic loader; see "
        "the keeper row of the machine table) and starts the command with "
        "clone(CLONE_VM | CLONE_VFORK). What is left is Popen of the keeper, the "
        "command's exec and the report; a keeper started ahead of time, waiting for "
        "its command, was not built: the command would get the process attributes "
        "(rlimits, umask, cgroup, nice, affinity) of the moment the spare started, "
        "not those of the call.",
    ),
    (
        "S6 ralph_reaper.Popen (native)",
        "As spawn_dispatch under keeper containment: two execs in series, and the "
        "keeper's report that the command runs is awaited (see the row above).",
    ),
    (
        "S6 ralph_reaper.Popen",
        "Without a keeper it is Popen plus a pin and the registration, about 60 us of "
        "Python and /proc reads when measured alone. The rest is the scheduler: the "
        "child starts on its parent's CPU, and once Popen has returned this process may "
        "wait out a time slice of the child's start-up there (perf sched: runnable, not "
        "running, 0.86-0.96 ms, the child on the same CPU; a read of the child's "
        "/proc stat, which the polling pin needs for its start time, made that wait "
        "likelier). Times are bimodal within one run (seen: p10 295 us, p50 538 us, "
        "p90 1.14 ms) and between runs; the Popen row's timing ends before that wait.",
    ),
    (
        "S6 ",
        "The concurrent.futures.Future that watch returns is most of it by itself.",
    ),
    (
        "S7 ",
        "A search reads the dispatch's own processes and lists the children of its "
        "ancestors (other than a host that adopts no orphans) born after it, with start "
        "times cached by pid; what still grows with the host is that listing of a "
        "crowded ancestor's children, one read of its children file and a lookup each.",
    ),
    (
        "S8 native, host a subreaper",
        "A process that adopts orphans cannot tell a child it forked from an adopted "
        "one, so a walk cannot leave out the other dispatches' trees and costs every "
        "dispatch started after the oldest it covers. Its monitor has the slices of a "
        "batch of stops share one walk, read in steps with other exits taken in between; "
        "what still holds them is a natural end's own search, which reads again the "
        "start times of the thousands of children once the cache was dropped (the "
        "allocator unread for over a second), and Python's cyclic garbage collector, "
        "whose full passes over the objects of thousands of dispatches pause the thread "
        "for tens of milliseconds. The host of design section 5 is no subreaper (the "
        "rows above).",
    ),
    (
        "S8 polling",
        "Without pidfds exits are found by polling rounds, taken between the storm's "
        "slices: a round's waitid gate walks all of this process's thousands of "
        "children in the kernel, once per exit it names, and each exit costs a /proc "
        "read; the interval between rounds is stretched to keep their share of a core "
        "bounded (ralph_reaper.polled), so other exits wait up to a round, and the "
        "storm's stops begin more slowly for the rounds between its slices.",
    ),
    (
        "S8 ",
        "Each stop reads its leader's stat and children file at SIGTERM and again after "
        "the exit, signals through a pidfd and builds its result in Python, on two cores "
        "shared with the storm's own exits and the machine's load (see the load average); "
        "other exits wait for a slice, and for the full passes of Python's cyclic garbage "
        "collector over the objects of thousands of dispatches (tens of milliseconds).",
    ),
]


def explain(targets: Sequence[Target]) -> list[str]:
    """One line per explanation that some missed target needs, in the order of WHY."""
    needed: dict[int, list[str]] = {}
    for target in targets:
        if target.met is not False:
            continue
        for i, (prefix, _why) in enumerate(WHY):
            if target.what.startswith(prefix):
                needed.setdefault(i, []).append(target.what)
                break
    lines = []
    for i in sorted(needed):
        prefix, why = WHY[i]
        lines.append(f"**{prefix.strip()}** ({len(needed[i])} missed): {why}")
    return lines
