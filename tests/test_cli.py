"""The ``ralph-reaper`` command, run as a user runs it, on every backend."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from procs import alive, session_pids, state, wait_until


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env["RALPH_REAPER_BACKEND"] = backend
    return env


def run_cli(backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ralph_reaper", *args],
        env=_env(backend),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_run_timeout_stops_the_tree_and_reports(backend: str) -> None:
    done = run_cli(
        backend,
        "run",
        "--json",
        "--timeout",
        "300ms",
        "--",
        "sh",
        "-c",
        "sleep 60 & sleep 60 & wait",
    )
    assert done.returncode == 124, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["status"] == "timeout"
    assert record["termination_method"] == "sigterm"
    assert record["descendants_killed"] == 2
    assert record["backend"] == backend
    leader = record["pid"]
    assert session_pids(leader) == []
    assert state(leader) is None


def test_run_human_report_names_what_was_stopped(backend: str) -> None:
    done = run_cli(backend, "run", "--timeout", "0.2s", "--", "sh", "-c", "sleep 60 & sleep 60")
    assert done.returncode == 124
    assert "timeout" in done.stderr
    assert "stopped by sigterm" in done.stderr
    assert re.search(r"[12] descendant\(s\) stopped", done.stderr)


@pytest.mark.parametrize("code", [0, 3, 255])
def test_run_mirrors_the_exit_code(backend: str, code: int) -> None:
    done = run_cli(backend, "run", "-q", "--", "sh", "-c", f"exit {code}")
    assert done.returncode == code
    assert done.stderr == ""


def test_run_reports_death_by_signal_as_128_plus_n(backend: str) -> None:
    done = run_cli(backend, "run", "--json", "--", "sh", "-c", "kill -KILL $$")
    assert done.returncode == 128 + 9
    record = json.loads(done.stdout)
    assert record["status"] == "terminated"
    assert record["return_code"] == -9
    assert record["signal"] == 9


def test_run_not_found_and_not_executable(backend: str, tmp_path: Path) -> None:
    missing = run_cli(backend, "run", "--", str(tmp_path / "no-such-command"))
    assert missing.returncode == 127
    assert "not found" in missing.stderr
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    denied = run_cli(backend, "run", "--", str(script))
    assert denied.returncode == 126
    assert "cannot execute" in denied.stderr


def test_run_exit_file_is_written_whole(backend: str, tmp_path: Path) -> None:
    target = tmp_path / "exit.json"
    done = run_cli(backend, "run", "-q", "--exit-file", str(target), "--", "sh", "-c", "exit 4")
    assert done.returncode == 4
    record = json.loads(target.read_text())
    assert record["return_code"] == 4
    assert record["command"] == ["sh", "-c", "exit 4"]
    assert [p.name for p in tmp_path.iterdir()] == ["exit.json"]


@pytest.mark.parametrize("option", ["--timeout", "--grace", "--eof-wait"])
@pytest.mark.parametrize("bad", ["abc", "-1s", "1x", ""])
def test_run_rejects_a_bad_duration_and_starts_nothing(
    backend: str, option: str, bad: str, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    done = run_cli(backend, "run", f"{option}={bad}", "--", "touch", str(marker))
    assert done.returncode == 2
    assert "invalid duration" in done.stderr
    assert not marker.exists()


def test_run_without_a_command_is_a_launcher_error(backend: str) -> None:
    done = run_cli(backend, "run", "--timeout", "1s")
    assert done.returncode == 125
    assert "no command" in done.stderr


def test_sigterm_to_run_stops_the_tree(backend: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    runner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ralph_reaper",
            "run",
            "--json",
            "--",
            "sh",
            "-c",
            f"sleep 60 & echo $$ $! > {pidfile}; wait",
        ],
        env=_env(backend),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_until(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2)
    leader, child = (int(x) for x in pidfile.read_text().split())
    runner.send_signal(signal.SIGTERM)
    out, _err = runner.communicate(timeout=60)
    assert runner.returncode == 128 + signal.SIGTERM
    record = json.loads(out)
    assert record["status"] == "terminated"
    assert record["descendants_killed"] == 1
    assert not alive(leader) and not alive(child)


def test_doctor_names_the_backend(backend: str) -> None:
    done = run_cli(backend, "doctor", "--json")
    assert done.returncode == 0
    info = json.loads(done.stdout)
    assert info["backend"] == backend
    assert info["features"]["pidfd"] in (True, False)
    human = run_cli(backend, "doctor")
    assert f"backend: {backend}" in human.stdout


def test_forcing_an_unknown_backend_says_why(backend: str) -> None:
    env = _env(backend)
    env["RALPH_REAPER_BACKEND"] = "turbo"
    done = subprocess.run(
        [sys.executable, "-m", "ralph_reaper", "run", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 125
    assert "unknown backend 'turbo'" in done.stderr


def test_watch_reports_exits_of_processes_it_did_not_start(backend: str) -> None:
    first = subprocess.Popen(["sh", "-c", "sleep 0.2; exit 5"])
    second = subprocess.Popen(["sh", "-c", "sleep 0.1; exit 6"])
    watcher = subprocess.run(
        [sys.executable, "-m", "ralph_reaper", "watch", str(first.pid), str(second.pid)],
        env=_env(backend),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.wait() == 5 and second.wait() == 6
    assert watcher.returncode == 0
    lines = watcher.stdout.splitlines()
    assert sorted(line.split(":")[0] for line in lines) == sorted([str(first.pid), str(second.pid)])


RUN = [sys.executable, "-m", "ralph_reaper", "run"]
EOF_CMD = ["sh", "-c", "cat >/dev/null; echo got-eof >&2; exit 3"]


def test_run_eof_wait_begins_the_stop_with_eof(backend: str) -> None:
    # The runner's stdin stays open (we hold the write end): only the stop's
    # EOF stage can end the command's read.
    stdin_r, stdin_w = os.pipe()
    try:
        done = subprocess.run(
            [*RUN, "--json", "--timeout", "300ms", "--eof-wait", "30s", "--", *EOF_CMD],
            env=_env(backend),
            stdin=stdin_r,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(stdin_r)
        os.close(stdin_w)
    assert done.returncode == 124, done.stderr
    assert "got-eof" in done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["status"] == "timeout" and record["termination_method"] == "eof"
    assert record["return_code"] == 3 and record["signal"] is None
    assert set(record["stage_ms"]) == {"eof"}


def test_run_eof_wait_forwards_stdin_and_its_eof(backend: str) -> None:
    done = subprocess.run(
        [*RUN, "--eof-wait", "5s", "--", "sh", "-c", "cat; exit 4"],
        env=_env(backend),
        input="hello\nworld\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 4, done.stderr
    assert done.stdout == "hello\nworld\n"
