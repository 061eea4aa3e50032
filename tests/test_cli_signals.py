"""Signals to ``run``: forwarded ones reach the command, termination signals stop the tree at
any moment (also while leftovers are being stopped), and the report is always written."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from procs import alive, wait_until
from test_cli_support import RUN, check_run_record, env_for, read_file

pytestmark = pytest.mark.timeout(120)

FORWARDED = ("USR1", "USR2", "WINCH", "CONT")


def _lines(path: Path) -> list[str]:
    return (read_file(path) or "").splitlines()


def test_other_signals_are_forwarded_to_the_command(backend: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    traps = "; ".join(f"trap 'echo {name} >> {log}' {name}" for name in FORWARDED)
    script = (
        f"{traps}; echo ready >> {log}; "
        f'while [ "$(wc -l < {log})" -lt {len(FORWARDED) + 1} ]; do sleep 0.05; done; exit 7'
    )
    runner = subprocess.Popen(
        [*RUN, "--json", "--", "sh", "-c", script],
        env=env_for(backend),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: "ready" in _lines(log))
        for count, name in enumerate(FORWARDED, start=2):
            runner.send_signal(getattr(signal, "SIG" + name))
            assert wait_until(lambda count=count: len(_lines(log)) >= count)
        _out, err = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 7, err
    assert _lines(log) == ["ready", *FORWARDED]
    record = check_run_record(err)
    assert record["forwarded_signals"] == ["SIG" + n for n in FORWARDED]
    assert record["received_signals"] == [] and record["stop_reason"] is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT])
def test_a_signal_while_leftovers_are_stopped_changes_nothing_but_the_report(
    backend: str, sig: signal.Signals, tmp_path: Path
) -> None:
    """The command exits at once, leaving a daemon (double fork, setsid) that ignores
    SIGTERM; the signal to ``run`` arrives while that daemon is being stopped."""
    pidfile = tmp_path / "daemon"
    got_term = tmp_path / "term"
    daemon = (
        f"trap 'echo term > {got_term}' TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done"
    )
    script = f'(setsid sh -c "{daemon}" &) ; while [ ! -s {pidfile} ]; do sleep 0.02; done; exit 0'
    runner = subprocess.Popen(
        [*RUN, "--json", "-k", "2s", "--", "sh", "-c", script],
        env=env_for(backend),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: got_term.exists(), timeout=30)
        runner.send_signal(sig)
        _out, err = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 0, err
    assert "Traceback" not in err
    record = check_run_record(err)
    assert record["return_code"] == 0 and record["descendants_killed"] >= 1
    daemon_pid = int(pidfile.read_text())
    assert wait_until(lambda: not alive(daemon_pid))


def test_sigquit_stops_the_tree_like_sigterm(backend: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    runner = subprocess.Popen(
        [*RUN, "--json", "--", "sh", "-c", f"sleep 60 & echo $$ $! > {pidfile}; wait"],
        env=env_for(backend),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: len((read_file(pidfile) or "").split()) == 2)
        leader, child = (int(x) for x in pidfile.read_text().split())
        runner.send_signal(signal.SIGQUIT)
        _out, err = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == -signal.SIGQUIT, err
    record = check_run_record(err)
    assert record["status"] == "terminated" and record["stop_reason"] == "signal"
    assert record["signal"] == signal.SIGQUIT and record["exit_signal"] == signal.SIGQUIT
    assert record["descendants_killed"] >= 1
    assert not alive(leader) and not alive(child)
    assert "on SIGQUIT to ralph-reaper" in err.splitlines()[0]
