"""``ralph-reaper watch`` as util-linux ``waitpid``, plus exit codes; and ``doctor``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_cli_support import check_record, run_cli, watch_schema

pytestmark = pytest.mark.timeout(120)


def _records(text: str) -> list[dict[str, object]]:
    return [check_record(json.loads(line), watch_schema()) for line in text.splitlines()]


def test_watch_waits_for_all_and_tells_each_exit(backend: str) -> None:
    first = subprocess.Popen(["sh", "-c", "sleep 0.3; exit 5"])
    second = subprocess.Popen(["sh", "-c", "sleep 0.1; exit 6"])
    try:
        watcher = run_cli(backend, "watch", "--json", str(first.pid), str(second.pid))
    finally:
        codes = (first.wait(), second.wait())
    assert codes == (5, 6)
    assert watcher.returncode == 0, watcher.stderr
    records = {r["pid"]: r for r in _records(watcher.stdout)}
    assert set(records) == {first.pid, second.pid}
    for proc, code in ((first, 5), (second, 6)):
        record = records[proc.pid]
        assert record["exited"] is True
        if record["learned"] != "unknown":  # the kernel could tell: it must be right
            assert record["return_code"] == code
            assert record["learned"] in ("pidfd", "proc")


def test_watch_is_silent_without_verbose(backend: str) -> None:
    proc = subprocess.Popen(["true"])
    try:
        watcher = run_cli(backend, "watch", str(proc.pid))
    finally:
        proc.wait()
    assert watcher.returncode == 0 and watcher.stdout == ""


def test_count_returns_after_the_first_exits(backend: str) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    quick = subprocess.Popen(["sh", "-c", "exit 2"])
    try:
        watcher = run_cli(backend, "watch", "-c", "1", "-v", str(sleeper.pid), str(quick.pid))
    finally:
        quick.wait()
        sleeper.kill()
        sleeper.wait()
    assert watcher.returncode == 0, watcher.stderr
    assert watcher.stdout.startswith(f"{quick.pid}: exited")


def test_timeout_expired_is_3_and_still_running_pids_are_told(backend: str) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        watcher = run_cli(backend, "watch", "--json", "-t", "0.2", str(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert watcher.returncode == 3
    (record,) = _records(watcher.stdout)
    assert record["exited"] is False and record["learned"] is None


def test_a_pid_that_is_not_running_is_1_unless_exited_is_given(
    backend: str, tmp_path: Path
) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert run_cli(backend, "watch", str(gone.pid)).returncode == 1
    target = tmp_path / "w.json"
    allowed = run_cli(backend, "watch", "-e", f"--json={target}", str(gone.pid))
    assert allowed.returncode == 0
    (record,) = _records(target.read_text())
    assert record["learned"] == "not_running"


@pytest.mark.parametrize("bad", [" 12", "12 ", "\uff11\uff12", "+12", "-12", "0", "1e3", "", "x"])
def test_watch_takes_ascii_digits_only(backend: str, bad: str) -> None:
    done = run_cli(backend, "watch", "-e", "--", bad)
    assert done.returncode == 125
    assert "invalid pid" in done.stderr


@pytest.mark.parametrize(
    "args", [["-c", "2", "1"], ["-c", "x", "1"], ["-t", "-1", "1"], ["--bogus", "1"]]
)
def test_watch_usage_errors_are_125(backend: str, args: list[str]) -> None:
    done = run_cli(backend, "watch", *args)
    assert done.returncode == 125
    assert "usage: ralph-reaper watch" in done.stderr or "ralph-reaper watch:" in done.stderr
    assert "usage: ralph-reaper [-h]" not in done.stderr


def test_doctor_tells_the_kernel_containment_and_cgroup(backend: str) -> None:
    done = run_cli(backend, "doctor", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["schema"] == 1
    assert info["backend"] == backend
    features = info["features"]
    assert features["pidfd"] in (True, False)
    assert features["child_subreaper"] is True  # Linux >= 3.4: the kernel's, not ours
    assert features["cgroup_kill"] in (True, False, None)
    expected = "keeper" if backend == "native" else "session"
    assert info["containment"]["mode"] == expected and info["containment"]["why"]
    cgroup = info["cgroup"]
    with open("/proc/self/cgroup") as f:
        own = [line[3:].strip() for line in f if line.startswith("0::")]
    if own:
        assert cgroup["v2_mount"] is not None
        assert cgroup["writable"] in (True, False) and cgroup["delegated"] in (True, False)
        assert cgroup["path"].startswith(cgroup["v2_mount"])
    human = run_cli(backend, "doctor")
    assert f"backend: {backend}" in human.stdout
    assert f"containment: {expected}" in human.stdout
    assert "cgroup v2:" in human.stdout
    assert os.path.basename(__file__) not in human.stdout
