"""Benchmarks of ralph-reaper against its baselines (design section 7); not part of the package.

Run from the repository root::

    python -m benchmarks.run [--quick] [--out BENCHMARKS.md] [--backends native,pure,polling]

``stamp.c`` is the exec'd child that stamps its exit time, ``floor.c`` the C
program that measures the machine's physical limit, ``baselines.py`` what we
compare with (the seed's polling module, the standard library, psutil),
``scenarios.py`` scenarios S1-S8, ``run.py`` the command.
"""
