"""Every Python sample of the README runs as written, on every backend.

The samples start the coding agent, ``pi``, which this machine does not
have: a stand-in ``pi`` (a shell script that exits 0, as an agent that
finished its ticket) comes first on ``PATH``. That is the only thing
supplied; each sample runs unchanged, in a fresh interpreter, in an empty
working directory, and must exit 0 and leave nothing running.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import procs

README = Path(__file__).resolve().parent.parent / "README.md"
SAMPLE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def samples() -> list[str]:
    return SAMPLE.findall(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_samples() -> None:
    assert len(samples()) >= 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", range(len(samples())))
def test_readme_sample_runs_as_written(backend: str, tmp_path: Path, index: int) -> None:
    code = samples()[index]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pi = bin_dir / "pi"
    pi.write_text("#!/bin/sh\nexit 0\n")
    pi.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = procs.child_env(RALPH_REAPER_BACKEND=backend)
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    run = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-c", code],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert run.returncode == 0, f"sample {index} failed:\n{code}\n{run.stdout}\n{run.stderr}"
    assert "completed" in run.stdout  # each sample prints how its dispatches ended
