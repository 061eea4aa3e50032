"""``ralph-reaper run``, run as a user runs it, on every backend; the JSON report on every path."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from procs import alive, session_pids, state, wait_until
from test_cli_support import RUN, check_run_record, env_for, run_cli, status_of

pytestmark = pytest.mark.timeout(120)


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
    assert done.stdout == ""
    record = check_run_record(done.stderr)
    assert record["status"] == "timeout"
    assert record["termination_method"] == "sigterm"
    assert record["descendants_killed"] == 2
    assert record["backend"] == backend
    assert record["exit_status"] == 124 and record["timeout_s"] == 0.3
    leader = record["pid"]
    assert session_pids(leader) == []
    assert state(leader) is None


def test_the_readme_example_prints_one_line_and_exits_124(backend: str) -> None:
    done = run_cli(backend, "run", "--timeout", "0.3s", "--", "sh", "-c", "sleep 60 & sleep 60")
    assert done.returncode == 124
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert re.fullmatch(
        r"ralph-reaper: sh: timeout after [0-9.]+ s; stopped by sigterm \(sigterm [0-9.]+ ms\); "
        r"killed by SIGTERM; [12] descendant\(s\) stopped",
        lines[0],
    ), lines[0]


@pytest.mark.parametrize("duration", ["0.3", "300ms", "0.3s"])
def test_the_duration_is_taken_as_timeout_spells_it(backend: str, duration: str) -> None:
    with_dashes = run_cli(backend, "run", "-q", duration, "--", "sleep", "60")
    without = run_cli(backend, "run", "-q", duration, "sleep", "60")
    assert with_dashes.returncode == without.returncode == 124


@pytest.mark.parametrize("code", [0, 3, 255])
def test_run_mirrors_the_exit_code_and_is_silent(backend: str, code: int) -> None:
    done = run_cli(backend, "run", "--", "sh", "-c", f"exit {code}")
    assert done.returncode == code
    assert done.stderr == ""


def test_verbose_reports_even_a_success(backend: str) -> None:
    done = run_cli(backend, "run", "-v", "--", "true")
    assert done.returncode == 0
    assert "ralph-reaper: true: completed after" in done.stderr


def test_run_ends_as_the_command_died_by_signal(backend: str) -> None:
    done = run_cli(backend, "run", "--json", "--", "sh", "-c", "kill -USR1 $$")
    assert done.returncode == -signal_number("SIGUSR1")
    record = check_run_record(done.stderr)
    assert record["status"] == "terminated"
    assert record["return_code"] == -signal_number("SIGUSR1")
    assert record["exit_signal"] == signal_number("SIGUSR1")
    assert record["exit_status"] == 128 + signal_number("SIGUSR1")


def signal_number(name: str) -> int:
    import signal

    return int(getattr(signal, name))


def test_json_never_shares_stdout_unless_asked(backend: str, tmp_path: Path) -> None:
    default = run_cli(backend, "run", "--json", "--", "printf", "x")
    assert default.returncode == 0 and default.stdout == "x"
    check_run_record(default.stderr)
    to_stdout = run_cli(backend, "run", "--json=-", "--", "printf", "x")
    assert to_stdout.stdout.startswith("x")
    assert check_run_record(to_stdout.stdout[1:])["return_code"] == 0
    target = tmp_path / "report.json"
    to_file = run_cli(backend, "run", f"--json={target}", "--", "printf", "x")
    assert to_file.stdout == "x" and to_file.stderr == ""
    assert check_run_record(target.read_text())["command"] == ["printf", "x"]
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_run_not_found_and_not_executable_report_too(backend: str, tmp_path: Path) -> None:
    missing = run_cli(backend, "run", "--json", "--", str(tmp_path / "no-such-command"))
    assert missing.returncode == 127
    assert missing.stderr.splitlines()[0].endswith(
        "not found: " + str(tmp_path / "no-such-command")
    )
    record = check_run_record(missing.stderr)
    assert record["launched"] is False and record["exit_status"] == 127
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    denied = run_cli(backend, "run", "--json", "--", str(script))
    assert denied.returncode == 126
    lines = denied.stderr.splitlines()
    assert len(lines) == 2 and "cannot execute" in lines[0]  # one message, then the JSON
    assert check_run_record(denied.stderr)["exit_status"] == 126


def test_run_exit_file_is_written_whole(backend: str, tmp_path: Path) -> None:
    target = tmp_path / "exit.json"
    done = run_cli(backend, "run", "-q", "--exit-file", str(target), "--", "sh", "-c", "exit 4")
    assert done.returncode == 4
    record = check_run_record(target.read_text())
    assert record["return_code"] == 4
    assert record["command"] == ["sh", "-c", "exit 4"]
    assert [p.name for p in tmp_path.iterdir()] == ["exit.json"]


@pytest.mark.parametrize(
    "option, bad",
    [
        ("--timeout", "abc"),
        ("--grace", "-1s"),
        ("--kill-after", "1x"),
        ("--eof-wait", ""),
        ("--timeout", " 1"),
        ("--idle-timeout", "\uff11s"),
    ],
)
def test_run_rejects_a_bad_duration_and_starts_nothing(
    backend: str, option: str, bad: str, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    done = run_cli(backend, "run", f"{option}={bad}", "--", "touch", str(marker))
    assert done.returncode == 125
    assert "invalid duration" in done.stderr
    assert "usage: ralph-reaper run" in done.stderr
    assert not marker.exists()


def test_a_negative_timeout_says_so(backend: str) -> None:
    done = run_cli(backend, "run", "--timeout", "-1", "--", "true")
    assert done.returncode == 125
    assert "must not be negative" in done.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--bogus", "--", "true"], "unknown option '--bogus'"),
        (["-x", "true"], "unknown option '-x'"),
        (["-s", "NOPE", "1", "true"], "invalid signal"),
        (["-s", "STOP", "1", "true"], "cannot end a process"),
        (["--timeout=1"], "no command given"),
        (["--json="], "--json= wants a target"),
        (["--preserve-status=1", "true"], "takes no value"),
        (["-k"], "needs a value"),
    ],
)
def test_usage_errors_exit_125_with_runs_usage(backend: str, args: list[str], words: str) -> None:
    done = run_cli(backend, "run", *args)
    assert done.returncode == 125
    assert words in done.stderr
    assert "usage: ralph-reaper run" in done.stderr
    assert "usage: ralph-reaper [-h]" not in done.stderr


def test_a_usage_error_still_writes_the_json_report(backend: str, tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    done = run_cli(backend, "run", f"--json={target}", "--bogus", "true")
    assert done.returncode == 125
    record = check_run_record(target.read_text())
    assert record["launched"] is False and record["exit_status"] == 125
    assert "--bogus" in record["error"]


def test_the_commands_own_options_are_not_ours(backend: str) -> None:
    done = run_cli(backend, "run", "--", "sh", "-c", "echo $1", "sh", "--json")
    assert done.returncode == 0 and done.stdout == "--json\n"
    after_duration = run_cli(backend, "run", "5", "echo", "-v", "-s")
    assert after_duration.stdout == "-v -s\n"


def test_help_is_runs_own(backend: str) -> None:
    done = run_cli(backend, "run", "--help")
    assert done.returncode == 0
    assert "--preserve-status" in done.stdout and "Exit status" in done.stdout


def test_a_closed_stdout_does_not_change_the_status(backend: str) -> None:
    r, w = os.pipe()
    os.close(r)  # nobody will ever read: every write gets EPIPE
    try:
        done = subprocess.run(
            [*RUN, "--json=-", "--", "sh", "-c", "exit 3"],
            env=env_for(backend),
            stdin=subprocess.DEVNULL,
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(w)
    assert done.returncode == 3
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_doctor_into_a_closed_pipe_exits_0(backend: str) -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ralph_reaper", "doctor"],
            env=env_for(backend),
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(w)
    assert done.returncode == 0
    assert "Traceback" not in done.stderr


def test_forcing_an_unknown_backend_says_why(backend: str) -> None:
    env = env_for(backend)
    env["RALPH_REAPER_BACKEND"] = "turbo"
    done = subprocess.run(
        [*RUN, "--json", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 125
    assert "unknown backend 'turbo'" in done.stderr
    record = check_run_record(done.stderr)
    assert record["launched"] is False and record["backend"] == ""


def test_top_level_usage_errors_exit_125(backend: str) -> None:
    assert run_cli(backend).returncode == 125
    assert run_cli(backend, "frobnicate").returncode == 125
    assert run_cli(backend, "doctor", "--bogus").returncode == 125


EOF_CMD = ["sh", "-c", "cat >/dev/null; echo got-eof >&2; exit 3"]


def test_run_eof_wait_begins_the_stop_with_eof(backend: str) -> None:
    # The runner's stdin stays open (we hold the write end): only the stop's
    # EOF stage can end the command's read.
    stdin_r, stdin_w = os.pipe()
    try:
        done = subprocess.run(
            [*RUN, "--json", "--timeout", "300ms", "--eof-wait", "30s", "--", *EOF_CMD],
            env=env_for(backend),
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
    record = check_run_record(done.stderr)
    assert record["status"] == "timeout" and record["termination_method"] == "eof"
    assert record["return_code"] == 3 and record["signal"] is None
    assert set(record["stage_ms"]) == {"eof"}


def test_run_eof_wait_forwards_stdin_and_its_eof(backend: str) -> None:
    done = subprocess.run(
        [*RUN, "--eof-wait", "5s", "--", "sh", "-c", "cat; exit 4"],
        env=env_for(backend),
        input="hello\nworld\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 4, done.stderr
    assert done.stdout == "hello\nworld\n"


def test_a_leftover_after_a_natural_exit_is_stopped_and_told(backend: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon"
    done = run_cli(
        backend,
        "run",
        "--json",
        "-k",
        "1s",
        "--",
        "sh",
        "-c",
        f"(setsid sleep 60 & echo $! > {pidfile}) ; exit 0",
    )
    assert done.returncode == 0, done.stderr
    daemon = int(pidfile.read_text())
    assert wait_until(lambda: not alive(daemon))
    record = check_run_record(done.stderr)
    assert record["descendants_killed"] >= 1
    assert "descendant(s) stopped" in done.stderr.splitlines()[0]
    assert status_of(done.returncode) == 0
    json.dumps(record)
