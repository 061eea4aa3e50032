"""Smoke test of the benchmarks: ``python -m benchmarks.run --quick`` runs and writes its report.

No timing is asserted (design section 7: benchmarks are not tests). The test
runs once, not once per backend: it does not take the ``backend`` fixture (the
benchmark itself runs every available backend), and it is skipped in jobs that
force one backend with ``RALPH_REAPER_BACKEND``, so a CI matrix over backends
runs it in the unforced job only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8")


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    bool(os.environ.get("RALPH_REAPER_BACKEND", "").strip()),
    reason="runs once, in the job that does not force a backend",
)
@pytest.mark.skipif(
    not (ROOT / "benchmarks" / "run.py").is_file(), reason="no benchmarks/ in this checkout"
)
@pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
    reason="the benchmarks build their C helpers and need a C compiler",
)
def test_quick_benchmark_writes_every_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "B.md"
    env = {k: v for k, v in os.environ.items() if k != "RALPH_REAPER_BACKEND"}
    try:
        import ralph_reaper  # noqa: F401
    except ImportError:  # pragma: no cover - the suite runs with the package importable
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
        )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    tail = f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{tail}"
    assert out.is_file()
    text = out.read_text(encoding="utf-8")
    for key in SCENARIOS:
        assert f"## {key}:" in text, f"{key} missing from the report"
    assert "python -m benchmarks.run --quick --out" in text
    # Every target, met or not, has an explanation ready for when it is missed, and
    # the missed ones of this run are explained under the targets table.
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.misses import WHY

    rows = [line.split("|") for line in text.splitlines()]
    targets = [r[1].strip() for r in rows if len(r) > 5 and r[-2].strip() in ("met", "MISSED")]
    assert targets
    unexplained = [w for w in targets if not any(w.startswith(p) for p, _ in WHY)]
    assert not unexplained, f"targets without an explanation: {unexplained}"
    if any(r[-2].strip() == "MISSED" for r in rows if len(r) > 5):
        assert "Why the missed ones are missed" in text
