"""``run`` against coreutils ``timeout``: the same command under both, the same statuses and
the same signals seen by the command; on every backend."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from procs import wait_until
from test_cli_support import (
    RUN,
    check_run_record,
    env_for,
    read_file,
    run_cli,
    run_timeout,
    status_of,
)

pytestmark = pytest.mark.timeout(120)

#: A timeout long enough for the command's shell to set its traps first (set-up only:
#: nothing is asserted about time; a trap set too late would fail the test, not pass it).
SETTLE = "2"


def _recorder(log: Path, *, ignore_term: bool = False, code_on: int = 0) -> list[str]:
    """A shell that writes each signal it gets (INT TERM HUP QUIT USR1) to ``log``.

    ``code_on``: exit with 40+N after recording signal N; 0: go on.
    """
    traps = []
    for name in ("INT", "TERM", "HUP", "QUIT", "USR1"):
        number = int(getattr(signal, "SIG" + name))
        action = f"echo {name} >> {log}"
        if code_on:
            action += f"; exit {40 + number}"
        if ignore_term and name == "TERM":
            action = f"echo {name} >> {log}"
        traps.append(f"trap '{action}' {name}")
    script = "; ".join(traps) + f"; echo ready >> {log}; while :; do sleep 0.05; done"
    return ["sh", "-c", script]


def _both(backend: str, args: list[str], tmp_path: Path) -> tuple[tuple[int, str], tuple[int, str]]:
    """Run ``args`` (timeout's options, duration, command) under both; (status, log) of each."""
    results = []
    for name in ("timeout", "run"):
        log = tmp_path / f"{name}.log"
        command = [a.replace("@LOG@", str(log)) for a in args]
        if name == "timeout":
            done = run_timeout(*command)
        else:
            done = run_cli(backend, "run", "-q", *command)
        results.append((status_of(done.returncode), read_file(log) or ""))
    return results[0], results[1]


def test_a_timeout_is_124_under_both(backend: str, tmp_path: Path) -> None:
    ours, theirs = _both(backend, ["0.3", "sleep", "60"], tmp_path)
    assert ours == theirs == (124, "")


@pytest.mark.parametrize("sig", ["TERM", "INT", "HUP", "QUIT", "USR1"])
def test_signal_option_names_the_first_signal_the_command_sees(
    backend: str, sig: str, tmp_path: Path
) -> None:
    theirs, ours = _both(
        backend, ["-s", sig, SETTLE, *_recorder(Path("@LOG@"), code_on=1)], tmp_path
    )
    assert theirs[0] == ours[0] == 124
    assert theirs[1].splitlines()[:2] == ours[1].splitlines()[:2] == ["ready", sig]


def test_preserve_status_gives_the_commands_status(backend: str, tmp_path: Path) -> None:
    recorder = _recorder(Path("@LOG@"), code_on=1)
    theirs, ours = _both(backend, ["--preserve-status", SETTLE, *recorder], tmp_path)
    assert theirs[0] == ours[0] == 40 + signal.SIGTERM
    assert theirs[1].splitlines()[:2] == ours[1].splitlines()[:2] == ["ready", "TERM"]


def test_kill_after_kills_a_command_that_ignores_the_signal(backend: str, tmp_path: Path) -> None:
    recorder = _recorder(Path("@LOG@"), ignore_term=True)
    theirs, ours = _both(backend, ["-k", "0.5", SETTLE, *recorder], tmp_path)
    assert theirs[0] == ours[0] == 128 + signal.SIGKILL
    assert theirs[1].splitlines()[:2] == ours[1].splitlines()[:2] == ["ready", "TERM"]


def test_signal_kill_is_137_under_both(backend: str, tmp_path: Path) -> None:
    ours, theirs = _both(backend, ["-s", "KILL", "0.3", "sleep", "60"], tmp_path)
    assert ours[0] == theirs[0] == 128 + signal.SIGKILL


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_codes_pass_through_both(backend: str, code: int, tmp_path: Path) -> None:
    ours, theirs = _both(backend, ["10", "sh", "-c", f"exit {code}"], tmp_path)
    assert ours[0] == theirs[0] == code


def test_death_by_signal_is_passed_on_by_both(backend: str) -> None:
    theirs = run_timeout("10", "sh", "-c", "kill -USR2 $$")
    ours = run_cli(backend, "run", "10", "sh", "-c", "kill -USR2 $$")
    assert theirs.returncode == ours.returncode == -signal.SIGUSR2


def test_not_found_and_not_executable_under_both(backend: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    assert (
        run_timeout("10", missing).returncode == run_cli(backend, "run", "10", missing).returncode
    )
    assert run_cli(backend, "run", "10", missing).returncode == 127
    script = tmp_path / "noexec"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o600)
    assert run_timeout("10", str(script)).returncode == 126
    assert run_cli(backend, "run", "10", str(script)).returncode == 126


@pytest.mark.parametrize(
    "args", [["-1", "true"], ["--bogus", "1", "true"], ["1x", "true"], ["-s", "NOPE", "1", "true"]]
)
def test_usage_errors_are_125_under_both(backend: str, args: list[str]) -> None:
    assert run_timeout(*args).returncode == 125
    assert run_cli(backend, "run", *args).returncode == 125


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_a_termination_signal_to_run_reaches_the_command_as_itself(
    backend: str, sig: signal.Signals, tmp_path: Path
) -> None:
    """What ``timeout`` does with these four: the command gets the signal received, and
    the exit status is the command's (here 40+N, from its trap).

    Compared with the documented behaviour rather than a live ``timeout``: the
    coreutils builds tried here start their command with every signal blocked, so a
    signal sent to ``timeout`` itself never reaches the command.
    """
    log = tmp_path / "run.log"
    proc = subprocess.Popen(
        [*RUN, "--json", "60", *_recorder(log, code_on=1)],
        env=env_for(backend),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: "ready" in (read_file(log) or ""))
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status_of(proc.returncode) == 40 + sig, err
    assert (read_file(log) or "").splitlines()[:2] == ["ready", sig.name[3:]]
    record = check_run_record(err)
    assert record["received_signals"] == [sig.name]
    assert record["stop_reason"] == "signal"
