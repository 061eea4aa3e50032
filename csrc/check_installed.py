"""Check that an installed ralph-reaper (a wheel) has its native parts, and that they run.

Usage: python check_installed.py [NOT_UNDER...]

Run it with the Python the wheel was installed into, from a directory that
does not hold the package's sources. It fails (exit status 1, one line per
problem) unless:
  - ``import ralph_reaper`` finds an installed package, not one below any
    NOT_UNDER directory (e.g. the checkout the wheel was built from),
  - the installed metadata's version is ``ralph_reaper.__version__``,
  - the compiled extension ``ralph_reaper._native`` imports from that package
    and ``backend_info()["backend"]`` is "native" (the test suite's conftest
    would quietly skip the native backend's tests without it),
  - the keeper executable ships in that package, runs, and mirrors the exit
    status of the command it starts.
Standard library and the package only: it is the first command of every
wheel test (.ci/run, cibuildwheel's test-command).
"""

from __future__ import annotations

import os
import subprocess
import sys


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def check(not_under: list[str]) -> list[str]:
    problems: list[str] = []
    import ralph_reaper
    from ralph_reaper import backend_info
    from ralph_reaper.keeper_path import keeper_path

    package_dir = os.path.dirname(os.path.abspath(ralph_reaper.__file__))
    print(f"ralph_reaper {ralph_reaper.__version__} from {package_dir}")
    for directory in not_under:
        if _inside(package_dir, directory):
            problems.append(f"ralph_reaper was imported from {package_dir}, below {directory}")

    try:
        from importlib.metadata import version

        installed = version("ralph-reaper")
    except Exception as exc:  # no metadata: not an installed distribution
        problems.append(f"no installed metadata for ralph-reaper ({exc})")
    else:
        if installed != ralph_reaper.__version__:
            problems.append(f"metadata says {installed}, the package {ralph_reaper.__version__}")

    try:
        from ralph_reaper import _native  # type: ignore[attr-defined]
    except ImportError as exc:
        problems.append(f"the extension does not import: {exc}")
    else:
        print(f"extension: {_native.__file__}")
        if not _inside(_native.__file__, package_dir):
            problems.append(f"the extension {_native.__file__} is not in {package_dir}")

    backend = backend_info()["backend"]
    print(f"backend: {backend}")
    if backend != "native":
        problems.append(f'backend_info()["backend"] is {backend!r}, not "native"')

    keeper = keeper_path()
    print(f"keeper: {keeper}")
    if keeper is None:
        problems.append("keeper_path() is None: the keeper is missing or not executable")
    else:
        if not _inside(keeper, package_dir):
            problems.append(f"the keeper {keeper} is not in {package_dir}")
        helped = subprocess.run([keeper, "--help"], capture_output=True, text=True, timeout=30)
        if helped.returncode != 0 or "usage:" not in helped.stdout:
            problems.append(f"keeper --help: status {helped.returncode}, {helped.stdout!r}")
        ran = subprocess.run([keeper, "--", "/bin/sh", "-c", "exit 7"], timeout=30)
        if ran.returncode != 7:
            problems.append(f"keeper -- sh -c 'exit 7' exited {ran.returncode}, not 7")
    return problems


def main() -> int:
    problems = check(sys.argv[1:])
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print("OK: the installed package has the native backend and a working keeper")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
