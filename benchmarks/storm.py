"""S8's storm in a host process as design section 5 has it: one that is no subreaper.

The benchmark itself is a child subreaper (so that it can count and reap what
every contestant orphans), and a process that adopts orphans cannot leave out
of a search the trees of dispatches it does not know it forked (see
``ralph_reaper.lineage``). A loop is no subreaper, so S8 runs its storm here,
in a fresh Python started by the benchmark; what the storm orphans still goes
to the benchmark, which counts it as before.

Usage: ``python -m benchmarks.storm STAMP BACKEND N OTHERS``; prints the
:class:`~benchmarks.scenarios.Storm` as one line of JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from ralph_reaper import backends as rr_backends

from .scenarios import Bench, Params, _s8_storm


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    stamp, backend, n, others = argv[0], argv[1], int(argv[2]), int(argv[3])
    params = dataclasses.replace(Params.make(False), s8_n=n, s8_others=others)
    bench = Bench(params, [backend], stamp, "", _log)
    try:
        with rr_backends.using(backend):
            storm = _s8_storm(bench, n, others)
    finally:
        bench.close()
    print(json.dumps(dataclasses.asdict(storm)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
