"""Driver for the keeper (csrc/keeper.c) built with sanitizers: ``make sanitize``.

Usage: python3 csrc/test_keeper.py KEEPER [WRAPPER...]

Standard library only (it runs before any virtualenv exists). It makes itself
a child subreaper (PID 1 here may never reap), runs the keeper binary through
the paths that matter (exit mirroring, exec failure, bad usage, stop by
signal and by control command, SIGKILL escalation, leftovers, parent death,
exit file, a dead report reader, a large tree that grows the pin table), and
checks the outcome of each. A sanitizer report makes the keeper exit with
status 99 (set SANITIZER_EXIT below), which no scenario expects, and every
scenario also checks that no sanitizer log file appeared. At the end nothing
may be left below this process.

WRAPPER (e.g. valgrind ...) is prepended to every keeper command line.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

SANITIZER_EXIT = 99
WAIT_S = 60.0
PY = sys.executable
SH = "/bin/sh"

PRELUDE = r"""
import os, signal, sys, time
def out(*pids):
    os.write(1, "".join("%d\n" % p for p in pids).encode())
def forever():
    while True:
        time.sleep(1000)
def child(fn=forever):
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid
"""


def py(code: str) -> list[str]:
    return [PY, "-c", PRELUDE + code]


class Failure(Exception):
    pass


def check(cond: object, what: str) -> None:
    if not cond:
        raise Failure(what)


def present(pid: int, start: bytes | None) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return start is None or data[data.rfind(b")") + 2 :].split()[19] == start


def start_of(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()[19]


def children_of(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rfind(b")") + 2 :].split()[1]) == pid:
                out.append(int(name))
    return out


class Run:
    def __init__(
        self,
        keeper: list[str],
        cmd: list[str],
        *,
        control: bool = False,
        opts: list[str] | None = None,
        close_report: bool = False,
        preexec: Any = None,
    ) -> None:
        self.report_r, w = os.pipe()
        args = [*keeper, "--report-fd", str(w)]
        fds = [w]
        self.control_w = None
        cr = None
        if control:
            cr, self.control_w = os.pipe()
            args += ["--control-fd", str(cr)]
            fds.append(cr)
        args += [*(opts or []), "--", *cmd]
        self.proc = subprocess.Popen(args, pass_fds=fds, stdout=subprocess.PIPE, preexec_fn=preexec)
        os.close(w)
        if cr is not None:
            os.close(cr)
        if close_report:
            os.close(self.report_r)
            self.report_r = -1
        assert self.proc.stdout is not None
        self.out_fd = self.proc.stdout.fileno()
        self.buf = b""
        self.members: list[tuple[int, bytes | None]] = []

    def pids(self, n: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.buf.count(b"\n") < n:
            left = deadline - time.monotonic()
            check(left > 0, "timed out waiting for the tree's pids")
            if select.select([self.out_fd], [], [], left)[0]:
                chunk = os.read(self.out_fd, 65536)
                check(chunk, "tree closed stdout early")
                self.buf += chunk
        lines = self.buf.split(b"\n")
        self.members = [(int(x), start_of(int(x))) for x in lines[:n]]
        self.buf = b"\n".join(lines[n:])

    def send(self, text: str) -> None:
        assert self.control_w is not None
        os.write(self.control_w, text.encode())

    def wait(self) -> tuple[int, list[dict[str, Any]]]:
        deadline = time.monotonic() + WAIT_S
        while True:
            pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.proc.pid, signal.SIGKILL)
                os.waitpid(self.proc.pid, 0)
                raise Failure("keeper did not exit")
            time.sleep(0.005)
        self.proc.returncode = 0
        report = b""
        if self.report_r >= 0:
            while True:
                chunk = os.read(self.report_r, 65536)
                if not chunk:
                    break
                report += chunk
            os.close(self.report_r)
        if self.control_w is not None:
            os.close(self.control_w)
        # Everything that held stdout is gone once the tree is.
        rest = self.buf
        while True:
            if not select.select([self.out_fd], [], [], 10)[0]:
                break
            chunk = os.read(self.out_fd, 65536)
            if not chunk:
                break
            rest += chunk
        self.proc.stdout.close()  # type: ignore[union-attr]
        late = [int(x) for x in rest.split() if x.strip()]
        self.members += [(p, start_of(p)) for p in late]
        left = [p for p, st in self.members if present(p, st)]
        check(not left, f"tree members survived the keeper: {left}")
        events = [json.loads(line) for line in report.decode().splitlines()]
        return status, events


def final(events: list[dict[str, Any]]) -> dict[str, Any]:
    ends = [e for e in events if e["event"] == "exit"]
    check(len(ends) == 1, f"one exit event expected: {events}")
    return ends[0]


def exit_code(status: int) -> int:
    check(os.WIFEXITED(status), f"expected a normal exit, got status {status:#x}")
    code = os.WEXITSTATUS(status)
    check(code != SANITIZER_EXIT, "sanitizer report (see stderr)")
    return code


def killed_by(status: int) -> int:
    check(os.WIFSIGNALED(status), f"expected death by signal, got status {status:#x}")
    return os.WTERMSIG(status)


# ---- scenarios ----------------------------------------------------------------


def s_exit_codes(k: list[str]) -> None:
    for code in (0, 3, 255):
        st, ev = Run(k, [SH, "-c", f"exit {code}"]).wait()
        check(exit_code(st) == code, f"exit {code} mirrored")
        check(final(ev)["status"] == st and final(ev)["method"] == "natural", "report")


def s_signals(k: list[str]) -> None:
    for sig in ("TERM", "KILL", "SEGV"):
        st, ev = Run(k, [SH, "-c", f"ulimit -c 0; kill -{sig} $$"]).wait()
        num = getattr(signal, "SIG" + sig)
        check(killed_by(st) == num and not os.WCOREDUMP(st), f"SIG{sig} mirrored")
        check(final(ev)["signal"] == num, "report signal")


def s_exec_failure(k: list[str]) -> None:
    st, ev = Run(k, ["/nonexistent/command"]).wait()
    check(exit_code(st) == 127 and final(ev)["exec_errno"] == errno.ENOENT, "ENOENT -> 127")
    st, ev = Run(k, ["/etc/passwd"]).wait()
    check(exit_code(st) == 126 and final(ev)["exec_errno"] == errno.EACCES, "EACCES -> 126")
    st, ev = Run(k, ["no-such-command-anywhere-on-path"]).wait()
    check(exit_code(st) == 127, "PATH search ENOENT -> 127")
    st, ev = Run(k, [""]).wait()
    check(exit_code(st) == 127, "empty command -> 127")
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "no-shebang")
        with open(script, "w") as f:
            f.write(f": > {d}/ran\n")
        os.chmod(script, 0o755)
        st, ev = Run(k, [script]).wait()
        check(exit_code(st) == 126 and final(ev)["exec_errno"] == errno.ENOEXEC, "ENOEXEC -> 126")
        check(not os.path.exists(os.path.join(d, "ran")), "no /bin/sh fallback")


def s_usage(k: list[str]) -> None:
    for args in (
        [],
        ["--"],
        ["--nope", "--", "true"],
        ["--grace-ms", "x", "--", "true"],
        ["--report-fd", "2", "--", "true"],
        ["--die-with-parent", "--", "true"],
        ["--exit-file", "/nonexistent/x", "--", "true"],
    ):
        proc = subprocess.run([*k, *args], stderr=subprocess.DEVNULL, check=False)
        check(proc.returncode == 125, f"bad usage {args} -> 125, got {proc.returncode}")


TREE = py(
    "def stubborn():\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "    out(os.getpid()); forever()\n"
    "def daemon():\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        out(os.getpid()); forever()\n"
    "child(stubborn)\n"
    "d = child(daemon); os.waitpid(d, 0)\n"
    "c = child(); os.kill(c, signal.SIGSTOP); os.waitpid(c, os.WUNTRACED)\n"
    "out(c, os.getpid()); forever()"
)


def s_stop_by_signal(k: list[str]) -> None:
    r = Run(k, TREE, opts=["--grace-ms", "200"])
    r.pids(4)
    os.kill(r.proc.pid, signal.SIGTERM)
    st, ev = r.wait()
    f = final(ev)
    check(killed_by(st) == signal.SIGTERM, "command TERMed")
    check(f["descendants_killed"] == 3 and f["reason"] == "signal", f"report {f}")
    check(f["stage_ms"]["sigkill"] is not None, "stubborn member needed SIGKILL")
    # Its timer waits to the microsecond now: never shorter than the grace, though.
    check(f["stage_ms"]["sigterm"] >= 200, f"SIGKILL after the whole grace: {f['stage_ms']}")


def s_stop_by_control(k: list[str]) -> None:
    r = Run(k, TREE, control=True)
    r.pids(4)
    r.send("hello\n" + "x" * 1000 + "\nstop 150\n")  # junk is ignored
    st, ev = r.wait()
    check(killed_by(st) == signal.SIGTERM and final(ev)["reason"] == "control", "stop 150")
    r = Run(
        k,
        py("signal.signal(signal.SIGTERM, signal.SIG_IGN); out(os.getpid()); forever()"),
        control=True,
        opts=["--grace-ms", "60000"],
    )
    r.pids(1)
    r.send("kill")  # no newline: taken at EOF
    os.close(r.control_w)  # type: ignore[arg-type]
    r.control_w = None
    st, ev = r.wait()
    check(killed_by(st) == signal.SIGKILL and final(ev)["method"] == "sigkill", "kill")


def s_big_tree(k: list[str]) -> None:
    r = Run(
        k,
        py("kids = [child() for i in range(300)]\nout(os.getpid(), *kids)\nforever()"),
        opts=["--grace-ms", "2000"],
    )
    r.pids(301)
    os.kill(r.proc.pid, signal.SIGTERM)
    st, ev = r.wait()
    check(killed_by(st) == signal.SIGTERM and final(ev)["descendants_killed"] == 300, "fan 300")
    r = Run(
        k,
        py(
            "def on_term(s, f):\n"
            "    child(lambda: (out(os.getpid()), forever()))\n"
            "signal.signal(signal.SIGTERM, on_term)\n"
            "out(os.getpid())\n"
            "for i in range(20):\n"
            "    pid = os.fork()\n"
            "    if pid:\n"
            "        os.waitpid(pid, 0); os._exit(0)\n"
            "    out(os.getpid())\n"
            "forever()"
        ),
        control=True,
    )
    r.pids(21)
    r.send("stop 100\n")
    st, ev = r.wait()
    check(final(ev)["descendants_killed"] >= 20, "chain that forks on TERM")


def s_leftovers(k: list[str]) -> None:
    r = Run(k, [SH, "-c", "sleep 1000 & echo $!; exit 9"], opts=["--grace-ms", "1000"])
    r.pids(1)
    st, ev = r.wait()
    f = final(ev)
    check(
        exit_code(st) == 9 and f["reason"] == "leftovers" and f["descendants_killed"] == 1,
        f"leftovers {f}",
    )
    check([e["event"] for e in ev] == ["started", "command_exit", "exit"], "event order")


def s_parent(k: list[str]) -> None:
    st, ev = Run(k, [SH, "-c", "exit 0"], opts=["--die-with-parent", "--parent-pid", "1"]).wait()
    check(exit_code(st) == 125 and final(ev)["method"] == "not_started", "dead parent")
    r = Run(
        k,
        py("child(); out(os.getpid()); forever()"),
        control=True,
        opts=["--die-with-parent", "--parent-pid", str(os.getpid())],
    )
    r.pids(1)
    os.close(r.control_w)  # type: ignore[arg-type]
    r.control_w = None
    st, ev = r.wait()
    check(
        final(ev)["reason"] == "parent_died" and final(ev)["descendants_killed"] == 1,
        "control EOF is parent death",
    )


def s_exit_file(k: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "exit.json")
        st, ev = Run(k, [SH, "-c", "exit 4"], opts=["--exit-file", path]).wait()
        check(exit_code(st) == 4, "exit 4")
        with open(path) as f:
            check(json.load(f) == final(ev), "exit file == final report")
        check(os.listdir(d) == ["exit.json"], "no temp file left")
        path = os.path.join(d, "x" * 250 + ".json")  # 255 bytes, the longest valid name
        st, ev = Run(k, [SH, "-c", "exit 3"], opts=["--exit-file", path]).wait()
        with open(path) as f:
            check(json.load(f) == final(ev), "exit file with a 255-byte name")


def _without_pidfds() -> None:
    """In the keeper's child before exec: pidfd_open fails with ENOSYS (a kernel < 5.3)."""

    class Insn(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint),
        ]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * 4)(
        Insn(0x20, 0, 0, 0),  # A = syscall number
        Insn(0x15, 0, 1, 434),  # pidfd_open, on every architecture
        Insn(0x06, 0, 0, 0x00050000 | errno.ENOSYS),
        Insn(0x06, 0, 0, 0x7FFF0000),
    )
    prog = Prog(len(insns), insns)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
        os._exit(90)  # PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP


def s_no_pidfds(k: list[str]) -> None:
    # Members pinned by pid and start time: still stopped, parents first.
    r = Run(k, TREE, opts=["--grace-ms", "200"], preexec=_without_pidfds)
    r.pids(4)
    os.kill(r.proc.pid, signal.SIGTERM)
    st, ev = r.wait()
    f = final(ev)
    check(killed_by(st) == signal.SIGTERM, "command TERMed without pidfds")
    check(f["descendants_killed"] == 3, f"every member reached without pidfds: {f}")
    check(f["stage_ms"]["sigkill"] is not None, "stubborn member SIGKILLed without pidfds")


def s_dead_reader(k: list[str]) -> None:
    st, _ = Run(k, [SH, "-c", "sleep 0.1; exit 6"], close_report=True).wait()
    check(exit_code(st) == 6, "EPIPE on the report fd is ignored")


SCENARIOS = [
    s_exit_codes,
    s_signals,
    s_exec_failure,
    s_usage,
    s_stop_by_signal,
    s_stop_by_control,
    s_big_tree,
    s_leftovers,
    s_parent,
    s_exit_file,
    s_dead_reader,
    s_no_pidfds,
]


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    keeper = [*sys.argv[2:], os.path.abspath(sys.argv[1])]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    logdir = tempfile.mkdtemp(prefix="keeper-san-")
    for var in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"):
        extra = f"exitcode={SANITIZER_EXIT}:log_path={logdir}/{var.split('_')[0].lower()}"
        os.environ[var] = ":".join(x for x in (os.environ.get(var, ""), extra) if x)
    failed = 0
    for scenario in SCENARIOS:
        name = scenario.__name__[2:]
        try:
            scenario(keeper)
            logs = os.listdir(logdir)
            check(not logs, f"sanitizer logs: {logs} in {logdir}")
        except Failure as exc:
            failed += 1
            print(f"FAIL {name}: {exc}")
            for log in os.listdir(logdir):
                with open(os.path.join(logdir, log)) as f:
                    sys.stdout.write(f.read())
        else:
            print(f"ok   {name}")
    leftovers = children_of(os.getpid())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # only our own descendants: clean up (and fail)
        for pid in children_of(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            break
        time.sleep(0.01)
    if leftovers:
        print(f"FAIL processes left behind: {leftovers}")
        failed += 1
    if not os.listdir(logdir):
        os.rmdir(logdir)
    print(f"{len(SCENARIOS) - failed}/{len(SCENARIOS)} keeper scenarios passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
