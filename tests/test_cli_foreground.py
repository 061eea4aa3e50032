"""``run --foreground`` in a real terminal (a tmux pane): the command reads ``/dev/tty``.

tmux gives the test a pseudo-terminal with a session and a foreground process
group, as an interactive shell would; keys are typed into it with
``send-keys``. The tmux server daemonizes: being this test process's orphan,
it comes back to the test (a subreaper), which stops it and reaps it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import alive, descendants_of, wait_until
from test_cli_support import check_run_record, read_file

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        shutil.which("tmux") is None,
        reason="tmux is not installed: no terminal to run --foreground in",
    ),
]


class Tmux:
    def __init__(self, tmp_path: Path) -> None:
        self.socket = f"rr-{uuid.uuid4().hex[:12]}"
        self.conf = tmp_path / "tmux.conf"
        self.conf.write_text("set -g remain-on-exit on\nset -g exit-empty off\n")
        self.server: int | None = None
        self.before: set[int] = set()

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.socket, "-f", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )

    def start(self, command: str) -> None:
        self.before = set(descendants_of(os.getpid()))
        self.tmux("new-session", "-d", "-s", "t", "-x", "100", "-y", "20", command)
        self.server = int(self.tmux("display-message", "-p", "#{pid}").stdout.strip())

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "t", text, "Enter")

    def close(self) -> None:
        if self.server is None:
            return
        subprocess.run(
            ["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30, check=False
        )
        # The daemonized server is this process's child now (a subreaper): reap it.
        assert wait_until(lambda: not alive(self.server or 0) or _zombie(self.server or 0))
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.server, 0)
        # What the server had started (the pane's processes) comes back here too.
        me = os.getpid()

        def settled() -> bool:
            left = [p for p in descendants_of(me) if p not in self.before]
            for pid in left:
                if _zombie(pid):
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
            return not [p for p in descendants_of(me) if p not in self.before]

        assert wait_until(settled)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.close()


def _run_line(backend: str, args: str) -> str:
    python = sys.executable
    path = os.pathsep.join(sys.path)
    return (
        f"env RALPH_REAPER_BACKEND={backend} PYTHONPATH='{path}' '{python}' -m ralph_reaper "
        f"run {args}"
    )


def test_foreground_command_reads_the_terminal(backend: str, tmux: Tmux, tmp_path: Path) -> None:
    out, ready, report = tmp_path / "out", tmp_path / "ready", tmp_path / "report.json"
    script = f'echo > {ready}; read line < /dev/tty; echo "got:$line" > {out}; exit 3'
    tmux.start(_run_line(backend, f"--foreground --json={report} 60 sh -c '{script}'"))
    assert wait_until(lambda: ready.exists(), timeout=30)
    tmux.type("hello")
    assert wait_until(lambda: report.exists(), timeout=30)
    assert read_file(out) == "got:hello\n"
    record = check_run_record(report.read_text())
    assert record["exit_status"] == 3 and record["backend"] == backend
    assert record["containment"] == ("keeper" if backend == "native" else "session")


def test_without_foreground_there_is_no_terminal(backend: str, tmux: Tmux, tmp_path: Path) -> None:
    out, report = tmp_path / "out", tmp_path / "report.json"
    script = f"if (exec 3</dev/tty) 2>/dev/null; then echo tty > {out}; else echo none > {out}; fi"
    tmux.start(_run_line(backend, f"--json={report} 60 sh -c '{script}' 2>/dev/null"))
    assert wait_until(lambda: report.exists(), timeout=30)
    assert read_file(out) == "none\n"


def test_foreground_still_stops_the_tree_on_timeout(
    backend: str, tmux: Tmux, tmp_path: Path
) -> None:
    pidfile, report = tmp_path / "pid", tmp_path / "report.json"
    script = f"sleep 60 & echo $! > {pidfile}; read line < /dev/tty"
    tmux.start(_run_line(backend, f"--foreground --json={report} 1 sh -c '{script}'"))
    assert wait_until(lambda: report.exists(), timeout=30)
    record = json.loads(report.read_text())
    check_run_record(report.read_text())
    assert record["exit_status"] == 124 and record["status"] == "timeout"
    child = int(pidfile.read_text())
    assert wait_until(lambda: not alive(child))
