"""The keeper executable (csrc/keeper.c) run directly, against real process trees.

Each test starts ``ralph-reaper-keeper`` with subprocess (report fd and control
fd are pipes passed with ``pass_fds``), lets the command's tree print its pids,
stops it (SIGTERM to the keeper, or ``stop 200`` on the control fd), waits for
the keeper, and then checks the real outcome: the keeper's own wait status
mirrors the command's, the report says what happened, and no pid of the tree
is left in /proc (not even as a zombie). Waits have generous deadlines only to
turn a hang into a failure; nothing asserts on timing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import pytest

from procs import alive
from ralph_reaper.keeper_path import keeper_linkage, keeper_path
from shapes import (
    PRELUDE,
    PY,
    SH,
    SHAPES,
    WAIT_S,
    Lines,
    Member,
    Shape,
    assert_gone,
    py,
)

_KEEPER = keeper_path()
if _KEEPER is None:
    pytest.skip(
        "ralph-reaper-keeper is not built (no C compiler when the package was installed?)",
        allow_module_level=True,
    )
KEEPER: str = _KEEPER


# ---- helpers ----------------------------------------------------------------


def exited(pid: int) -> bool:
    """True once our child pid has exited; it stays unreaped (unlike Popen.poll)."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None and info.si_pid == pid


def wait_status(pid: int, timeout: float = WAIT_S) -> int:
    """Raw wait status of our child pid (polling, so a hang becomes a failure)."""
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not exit within {timeout} s")
        time.sleep(0.005)


class Keeper:
    """One keeper run: report pipe, optional control pipe, the tree's stdout."""

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        grace_ms: Optional[int] = None,
        control: bool = False,
        exit_file: Optional[str] = None,
        extra: Sequence[str] = (),
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.report_r, report_w = os.pipe()
        args = [KEEPER, "--report-fd", str(report_w)]
        fds = [report_w]
        control_r = None
        self.control_w: Optional[int] = None
        if control:
            control_r, self.control_w = os.pipe()
            args += ["--control-fd", str(control_r)]
            fds.append(control_r)
        if grace_ms is not None:
            args += ["--grace-ms", str(grace_ms)]
        if exit_file is not None:
            args += ["--exit-file", exit_file]
        args += [*extra, "--", *cmd]
        try:
            self.proc = subprocess.Popen(args, pass_fds=fds, stdout=subprocess.PIPE, env=env)
        finally:
            os.close(report_w)
            if control_r is not None:
                os.close(control_r)
        assert self.proc.stdout is not None
        self.out = Lines(self.proc.stdout.fileno())
        self.report = Lines(self.report_r)
        self.status: Optional[int] = None
        self.events: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self, n: int) -> list[Member]:
        """Read n pids the tree printed on stdout (one per line)."""
        out = []
        for _ in range(n):
            line = self.out.readline()
            assert line is not None, "the tree closed stdout before printing its pids"
            out.append(Member(int(line)))
        return out

    def next_event(self) -> dict[str, Any]:
        line = self.report.readline()
        assert line is not None, "the keeper closed the report pipe early"
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    def terminate(self) -> None:
        # os.kill, not Popen.send_signal: that one may reap the keeper behind
        # our back. Until we reap it, its pid cannot be reused.
        if self.status is None:
            os.kill(self.pid, signal.SIGTERM)

    def control(self, text: str) -> None:
        assert self.control_w is not None
        with contextlib.suppress(BrokenPipeError):  # the keeper is already gone
            os.write(self.control_w, text.encode())

    def wait(self, timeout: float = WAIT_S) -> int:
        """The keeper's raw wait status; then the rest of its report."""
        self.status = wait_status(self.pid, timeout)
        self.proc.returncode = os.waitstatus_to_exitcode(self.status)
        self.events += [json.loads(line) for line in self.report.rest()]
        return self.status

    def event(self, name: str) -> dict[str, Any]:
        found = [e for e in self.events if e["event"] == name]
        assert len(found) == 1, f"expected one {name!r} event in {self.events}"
        return found[0]

    @property
    def final(self) -> dict[str, Any]:
        return self.event("exit")

    def close(self) -> None:
        if self.status is None:  # a failed test: do not leave the keeper behind
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(AssertionError, ChildProcessError, ValueError):
                self.wait(5)
        for fd in (self.report_r, self.control_w):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.report_r = -1
        self.control_w = None
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def keepers() -> Iterator[list[Keeper]]:
    runs: list[Keeper] = []
    yield runs
    for k in runs:
        k.close()


@pytest.fixture
def run(keepers: list[Keeper]) -> Any:
    def start(cmd: Sequence[str], **kwargs: Any) -> Keeper:
        k = Keeper(cmd, **kwargs)
        keepers.append(k)
        return k

    return start


def same_status(keeper_status: int, command_status: int) -> bool:
    """Equal wait statuses, ignoring the core-dump flag (the keeper never dumps core)."""
    return (keeper_status & ~0x80) == (command_status & ~0x80)


# ---- exit mirroring ----------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_code_is_mirrored(run: Any, code: int) -> None:
    k = run([SH, "-c", f"exit {code}"])
    status = k.wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == code
    started, final = k.event("started"), k.final
    assert started["pid"] == final["pid"]
    assert final["status"] == status
    assert final["exit_code"] == code and final["signal"] is None
    assert final["method"] == "natural" and final["reason"] == "exit"
    assert final["descendants_killed"] == 0 and final["exec_errno"] == 0
    assert final["survivors"] == []
    assert final["stage_ms"] == {"sigterm": None, "sigkill": None}
    assert k.event("command_exit")["status"] == status
    # the command_exit line comes before the final one
    assert [e["event"] for e in k.events] == ["started", "command_exit", "exit"]


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL, signal.SIGTERM])
def test_death_by_signal_is_mirrored(run: Any, sig: signal.Signals) -> None:
    # ulimit -c 0: no core file from the command either, so the statuses are equal.
    k = run([SH, "-c", f"ulimit -c 0; kill -{sig.name[3:]} $$"])
    status = k.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig
    assert not os.WCOREDUMP(status), "the keeper must not dump core"
    final = k.final
    assert final["signal"] == sig and final["exit_code"] is None
    assert final["status"] == status and final["core_dumped"] is False
    assert final["method"] == "natural" and final["reason"] == "exit"


@pytest.mark.parametrize(
    ("cmd", "code", "err"),
    [
        (["/nonexistent/ralph-reaper-no-such-file"], 127, errno.ENOENT),
        (["ralph-reaper-no-such-command-on-path"], 127, errno.ENOENT),
        (["/etc/passwd"], 126, errno.EACCES),  # not executable
        (["/"], 126, errno.EACCES),  # a directory
    ],
)
def test_exec_failure(run: Any, cmd: list[str], code: int, err: int) -> None:
    k = run(cmd)
    status = k.wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == code
    final = k.final
    assert final["exec_errno"] == err
    assert final["exit_code"] == code and final["status"] == status
    assert not [e for e in k.events if e["event"] == "started"]


@pytest.mark.parametrize("via_path", [False, True], ids=["by_path", "on_PATH"])
def test_a_file_without_shebang_is_an_exec_failure(run: Any, tmp_path: Any, via_path: bool) -> None:
    # As subprocess does: ENOEXEC is an error, the file is not run by /bin/sh.
    marker = tmp_path / "ran"
    script = tmp_path / "no-shebang"
    script.write_text(f": > {marker}\n")
    script.chmod(0o755)
    env = {**os.environ, "PATH": str(tmp_path)} if via_path else None
    k = run([script.name if via_path else str(script)], env=env)
    status = k.wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 126
    assert k.final["exec_errno"] == errno.ENOEXEC
    assert not [e for e in k.events if e["event"] == "started"]
    assert not marker.exists()


def _marker_cmd(path: str) -> list[str]:
    return [SH, "-c", f": > {path}"]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--"],
        ["--bogus", "--", "CMD"],
        ["--grace-ms", "soon", "--", "CMD"],
        ["--grace-ms", "-1", "--", "CMD"],
        ["--grace-ms"],
        ["--report-fd", "1", "--", "CMD"],
        ["--control-fd", "987", "--", "CMD"],  # not open
        ["--die-with-parent", "--", "CMD"],
        ["--parent-pid", "1", "--", "CMD"],
        ["--exit-file", "/nonexistent-dir/result.json", "--", "CMD"],
    ],
)
def test_bad_usage_starts_nothing(tmp_path: Any, args: list[str]) -> None:
    marker = str(tmp_path / "started")
    cmd = [KEEPER]
    for a in args:
        cmd += _marker_cmd(marker) if a == "CMD" else [a]
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, timeout=WAIT_S, check=False)
    assert proc.returncode == 125
    assert proc.stderr.strip(), "bad usage must say why on stderr"
    assert not os.path.exists(marker)


# ---- tree shapes ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "control_stop"])
@pytest.mark.parametrize("shape", SHAPES, ids=repr)
def test_tree_is_stopped_and_nothing_survives(run: Any, shape: Shape, how: str) -> None:
    if how == "sigterm":
        k = run(shape.cmd, grace_ms=300, env=shape.env)
    else:
        k = run(shape.cmd, control=True, env=shape.env)  # default grace 5000; stop says 200
    members = k.pids(shape.npids)
    started = k.next_event()
    assert started["event"] == "started"
    assert started["pid"] in [m.pid for m in members]
    if shape.leader_exits is not None:
        # The survivors are being stopped already; a stop request now only races with that.
        assert k.next_event()["event"] == "command_exit"
    if how == "sigterm":
        k.terminate()
    else:
        k.control("stop 200\n")
    status = k.wait()
    late = [Member(int(line)) for line in k.out.rest() if line.strip()]  # forked on SIGTERM
    assert_gone(members + late)

    final = k.final
    assert same_status(status, final["status"])
    if shape.leader_exits is not None:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == shape.leader_exits
        assert final["reason"] == "leftovers" and final["method"] == "natural"
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert final["reason"] == ("signal" if how == "sigterm" else "control")
        assert final["method"] == "sigterm"
        assert final["stage_ms"]["sigterm"] is not None
    if shape.exact:
        assert final["descendants_killed"] == shape.killed
    else:
        assert final["descendants_killed"] >= shape.killed + len(late)


def test_command_exits_while_background_child_lives(run: Any) -> None:
    k = run([SH, "-c", "sleep 1000 & echo $!; exit 3"], grace_ms=1000)
    members = k.pids(1)
    status = k.wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    assert_gone(members)
    final = k.final
    assert final["exit_code"] == 3 and final["method"] == "natural"
    assert final["reason"] == "leftovers" and final["descendants_killed"] == 1
    names = [e["event"] for e in k.events]
    assert names == ["started", "command_exit", "exit"]


def test_control_kill_skips_the_grace(run: Any) -> None:
    k = run(
        py("signal.signal(signal.SIGTERM, signal.SIG_IGN); out(os.getpid()); forever()"),
        control=True,
        grace_ms=60_000,
    )
    members = k.pids(1)
    k.next_event()
    k.control("kill\n")
    status = k.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert_gone(members)
    final = k.final
    assert final["method"] == "sigkill" and final["reason"] == "control"
    assert final["stage_ms"]["sigterm"] is None and final["stage_ms"]["sigkill"] is not None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1])
def test_control_stop_begins_with_the_signal_named(run: Any, sig: signal.Signals) -> None:
    """``stop <ms> <signo>``: the command gets that signal first, as when the keeper
    itself receives it; the grace is the one given on the line."""
    k = run(
        py("signal.signal(signal.SIGTERM, signal.SIG_IGN); out(os.getpid()); forever()"),
        control=True,
        grace_ms=60_000,
    )
    members = k.pids(1)
    k.next_event()
    k.control(f"stop 30000 {int(sig)}\n")
    status = k.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig
    assert_gone(members)
    assert k.final["method"] == "sigterm" and k.final["reason"] == "control"


def test_control_stop_with_sigkill_skips_the_grace(run: Any) -> None:
    k = run(
        py("signal.signal(signal.SIGTERM, signal.SIG_IGN); out(os.getpid()); forever()"),
        control=True,
        grace_ms=60_000,
    )
    members = k.pids(1)
    k.next_event()
    k.control("stop 60000 9\n")
    status = k.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert_gone(members)
    assert k.final["stage_ms"]["sigterm"] is None


@pytest.mark.parametrize("line", ["stop 200 0", "stop 200 65", "stop 200 x", "stop 200 -15"])
def test_a_bad_signal_on_a_stop_line_is_ignored(run: Any, line: str) -> None:
    """A line the keeper cannot read changes nothing; the next good one is obeyed."""
    k = run(
        py(
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGUSR1, lambda *a: os._exit(3))\n"
            "out(os.getpid()); forever()"
        ),
        control=True,
        grace_ms=60_000,
    )
    members = k.pids(1)
    k.next_event()
    k.control(line + "\n")  # obeyed, it would start a stop the next line cannot change
    k.control(f"stop 60000 {int(signal.SIGUSR1)}\n")  # the handler exits 3
    status = k.wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    assert_gone(members)
    assert k.final["reason"] == "control"


def test_command_ignoring_sigterm_gets_sigkill_after_grace(run: Any) -> None:
    k = run(
        py("signal.signal(signal.SIGTERM, signal.SIG_IGN); out(os.getpid()); forever()"),
        control=True,
    )
    members = k.pids(1)
    k.next_event()
    k.control("stop 200\n")
    status = k.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert_gone(members)
    final = k.final
    assert final["method"] == "sigkill"
    assert final["stage_ms"]["sigterm"] is not None and final["stage_ms"]["sigkill"] is not None


def test_command_handling_sigterm_exits_with_its_own_code(run: Any) -> None:
    k = run(
        py("signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\nout(os.getpid()); forever()"),
        grace_ms=10_000,
    )
    members = k.pids(1)
    k.next_event()
    k.terminate()
    status = k.wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert_gone(members)
    assert k.final["method"] == "sigterm" and k.final["reason"] == "signal"


# ---- exit file -------------------------------------------------------------------


def test_exit_file_is_written_atomically(run: Any, tmp_path: Any) -> None:
    path = tmp_path / "result.json"
    path.write_text("stale\n")
    k = run([SH, "-c", "exit 5"], exit_file=str(path))
    status = k.wait()
    assert os.WEXITSTATUS(status) == 5
    assert sorted(os.listdir(tmp_path)) == ["result.json"], "temp file left behind"
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    assert json.loads(text) == k.final
    assert k.final["exit_code"] == 5


def test_exit_file_with_the_longest_valid_name(run: Any, tmp_path: Any) -> None:
    # A 255-byte name is valid: the temp file beside it must have a short name.
    path = tmp_path / ("r" * 250 + ".json")
    k = run([SH, "-c", "exit 4"], exit_file=str(path))
    status = k.wait()
    assert os.WEXITSTATUS(status) == 4
    assert json.loads(path.read_text()) == k.final
    assert sorted(os.listdir(tmp_path)) == [path.name], "temp file left behind"


# ---- parent death ------------------------------------------------------------------

_HOST = r"""
import os, subprocess, sys, threading, time
keeper, exit_file, tree, from_thread = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
args = [keeper, "--die-with-parent", "--parent-pid", str(os.getpid()),
        "--exit-file", exit_file, "--", sys.executable, "-c", tree]
box = []
if from_thread:
    t = threading.Thread(target=lambda: box.append(subprocess.Popen(args)))
    t.start()
    t.join()
    time.sleep(0.3)  # the thread is gone: the keeper must still be running
else:
    box.append(subprocess.Popen(args))
os.write(1, b"keeper %d\n" % box[0].pid)
while True:
    time.sleep(1000)
"""

_HOST_TREE = PRELUDE + (
    "def member():\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "    out(os.getpid())\n"
    "    forever()\n"
    "for i in range(3):\n"
    "    child(member)\n"
    "child(lambda: (os.setsid(), out(os.getpid()), forever()))\n"
    "out(os.getpid()); forever()"
)


@pytest.mark.parametrize("from_thread", [False, True], ids=["host_main_thread", "host_thread"])
def test_host_killed_by_sigkill_takes_the_tree_down(tmp_path: Any, from_thread: bool) -> None:
    exit_file = str(tmp_path / "exit.json")
    host = subprocess.Popen(
        [PY, "-c", _HOST, KEEPER, exit_file, _HOST_TREE, "1" if from_thread else "0"],
        stdout=subprocess.PIPE,
    )
    assert host.stdout is not None
    lines = Lines(host.stdout.fileno())
    keeper_pid = None
    try:
        members = []
        for _ in range(6):  # 5 tree pids and the keeper's, in any order
            line = lines.readline()
            assert line is not None
            if line.startswith("keeper "):
                keeper_pid = int(line.split()[1])
            else:
                members.append(Member(int(line)))
        assert keeper_pid is not None
        assert all(m.present() and alive(m.pid) for m in members), "tree stopped too early"
        host.kill()
        host.wait(WAIT_S)
        # The keeper is reparented to us (the test process is a subreaper).
        status = wait_status(keeper_pid, 10.0)
        keeper_pid = None
        deadline = time.monotonic() + 10.0
        while any(m.present() for m in members) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert_gone(members)
        with open(exit_file) as f:
            final = json.load(f)
        assert final["reason"] == "parent_died"
        assert final["descendants_killed"] == 4
        assert same_status(status, final["status"])
    finally:
        if host.returncode is None:
            host.kill()
            host.wait(WAIT_S)
        if keeper_pid is not None:
            try:
                os.kill(keeper_pid, signal.SIGKILL)
                wait_status(keeper_pid, 5.0)
            except (OSError, AssertionError):
                pass
        host.stdout.close()


def test_control_eof_counts_as_host_death_with_die_with_parent(run: Any) -> None:
    k = run(
        py("child(lambda: (out(os.getpid()), forever())); out(os.getpid()); forever()"),
        control=True,
        extra=["--die-with-parent", "--parent-pid", str(os.getpid())],
    )
    members = k.pids(2)
    k.next_event()
    assert k.control_w is not None
    os.close(k.control_w)
    k.control_w = None
    status = k.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert_gone(members)
    assert k.final["reason"] == "parent_died" and k.final["descendants_killed"] == 1


def test_control_eof_without_die_with_parent_is_ignored(run: Any) -> None:
    k = run(py("out(os.getpid()); forever()"), control=True)
    members = k.pids(1)
    k.next_event()
    assert k.control_w is not None
    os.close(k.control_w)
    k.control_w = None
    time.sleep(0.2)  # give a wrong keeper the chance to stop the tree (not a timing check)
    assert not exited(k.pid) and all(m.present() for m in members)
    k.terminate()
    status = k.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert k.final["reason"] == "signal"
    assert_gone(members)


def test_parent_already_dead_starts_nothing(run: Any, tmp_path: Any) -> None:
    marker = str(tmp_path / "started")
    exit_file = str(tmp_path / "exit.json")
    # pid 1 is not our parent: as if the real parent had died before the check.
    k = run(
        _marker_cmd(marker), exit_file=exit_file, extra=["--die-with-parent", "--parent-pid", "1"]
    )
    status = k.wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 125
    assert not os.path.exists(marker)
    final = k.final
    assert final["pid"] is None and final["status"] is None
    assert final["method"] == "not_started" and final["error"] == "parent_died"
    with open(exit_file) as f:
        assert json.load(f) == final


def test_keeper_linkage_tells_a_static_executable_from_a_dynamic_one(tmp_path: Path) -> None:
    # What the doctor and the benchmarks say of the keeper (a static one ignores
    # LD_PRELOAD and starts without the dynamic loader).
    assert keeper_linkage(sys.executable) == "dynamic"
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    assert keeper_linkage(str(script)) is None
    assert keeper_linkage(str(tmp_path / "missing")) is None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a static executable")
    source, out = tmp_path / "main.c", tmp_path / "main"
    source.write_text("int main(void) { return 0; }\n")
    built = subprocess.run([cc, "-static", "-o", str(out), str(source)], capture_output=True)
    if built.returncode != 0:
        pytest.skip(f"this C library cannot be linked statically: {built.stderr[-200:]!r}")
    assert keeper_linkage(str(out)) == "static"
    assert subprocess.run([str(out)]).returncode == 0
