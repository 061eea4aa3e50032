"""The typed example (``tests/typing/typed_loop.py``): it type-checks under ``mypy --strict``
(its deliberate mistakes included, which must be caught), and it runs, on every backend."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import procs

EXAMPLE = Path(__file__).resolve().parent / "typing" / "typed_loop.py"


@pytest.mark.timeout(300)
def test_typed_example_passes_mypy_strict() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (it comes with the 'dev' extra)")
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(EXAMPLE)],
        env=procs.child_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.timeout(60)
def test_typed_example_runs(backend: str) -> None:
    run = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env=procs.child_env(RALPH_REAPER_BACKEND=backend),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.split()[0] == backend
    assert "[pt-1]" in run.stderr  # the ticket logger got its ticket
