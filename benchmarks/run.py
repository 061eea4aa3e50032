"""Run every benchmark scenario (design section 7) for every backend and baseline.

    python -m benchmarks.run [--quick] [--out BENCHMARKS.md] [--backends native,pure,polling]

From the repository root (``src`` is put on the path when the package is not
installed). Builds the C helpers (stamp, floor) with the system compiler into
a temporary directory, runs S1-S8, prints one table per scenario with the
targets met or missed, and writes the report atomically to ``--out``.
``--quick`` runs small sizes and few repetitions (a smoke test; its numbers
mean little); the full run takes several minutes and wants a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

try:
    import ralph_reaper
except ImportError:  # a source checkout without an install: use src/
    sys.path.insert(0, str(ROOT / "src"))
    import ralph_reaper

from ralph_reaper import backends as rr_backends  # noqa: E402
from ralph_reaper.keeper_path import keeper_linkage, keeper_path  # noqa: E402

from . import baselines  # noqa: E402
from .misses import explain  # noqa: E402
from .scenarios import SCENARIOS, Bench, Params, Table, load_monitor, met_text, sweep  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36
CFLAGS = ["-O2", "-std=gnu99", "-Wall", "-Wextra", "-Werror"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- environment -----------------------------------------------------------------------


def become_subreaper() -> None:
    """Orphans of everything this process starts come back to it, to be counted and reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def read_first(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def tasks_in_use() -> int:
    """Processes and threads on the machine (each takes a pid): /proc/loadavg field 4."""
    try:
        return int(read_first("/proc/loadavg").split()[3].split("/")[1])
    except (IndexError, ValueError):
        return sum(1 for name in os.listdir("/proc") if name.isdigit())


def keeper_row(path: Optional[str]) -> str:
    """How the keeper was linked: its start-up (a dynamic loader or none) is on the
    path of every keeper spawn, so the S6 keeper rows depend on it."""
    if path is None:
        return "no"
    linkage = keeper_linkage(path)
    if linkage != "static":
        return f"yes ({linkage or 'linkage unknown'})"
    with open(path, "rb") as f:
        libc = "glibc" if b"glibc." in f.read() else "without glibc"
    return f"yes (static, {libc})"


def build(build_dir: Path) -> tuple[str, str, str, str]:
    """Compile stamp, floor and crowd; return their paths and the compiler's name."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc) found: the benchmarks need one for their helpers")
    out = []
    for name in ("stamp", "floor", "crowd"):
        exe = build_dir / name
        cmd = [cc, *CFLAGS, "-o", str(exe), str(HERE / f"{name}.c")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"building {name} failed:\n{' '.join(cmd)}\n{proc.stderr}")
        out.append(str(exe))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    return out[0], out[1], out[2], (version.stdout.splitlines() or [cc])[0]


def fit_sizes(params: Params, notes: list[str]) -> None:
    """Shrink the sizes that cannot fit under pid_max next to what already runs."""
    try:
        pid_max = int(read_first("/proc/sys/kernel/pid_max"))
    except ValueError:
        return
    room = pid_max - tasks_in_use() - 2000  # headroom for trees, keepers, colleagues
    if params.s3_n > room:
        notes.append(f"S3 N reduced from {params.s3_n} to {room} to fit pid_max={pid_max}")
        params.s3_n = room
    sizes = tuple(min(n, room) for n in params.s2_sizes)
    if sizes != params.s2_sizes:
        notes.append(f"S2 sizes reduced to {sizes} to fit pid_max={pid_max}")
        params.s2_sizes = sizes
    crowds = tuple(min(n, room) for n in params.s7_sizes)
    if crowds != params.s7_sizes:
        notes.append(f"S7 sizes reduced to {crowds} to fit pid_max={pid_max}")
        params.s7_sizes = crowds


# --- report ----------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_table(t: Table) -> str:
    parts = [f"## {t.title}", "", t.protocol, "", md_table(t.header, t.rows)]
    if t.ratio_rows:
        parts += ["", f"{t.ratio_title}:", "", md_table(t.ratio_header, t.ratio_rows)]
    if t.targets:
        rows = [[x.what, x.target, x.measured, met_text(x.met)] for x in t.targets]
        parts += [
            "",
            "Targets (design section 7):",
            "",
            md_table(["what", "target", "measured", ""], rows),
        ]
    for note in t.notes:
        parts += ["", f"Note: {note}"]
    return "\n".join(parts) + "\n"


FAIRNESS = [
    "Ours is measured through the public API with default arguments, so every figure "
    "includes what a caller pays: pinning, discovering the dispatch's session in /proc "
    "(children of 'ours' rows lead their own session, as Ralph's dispatches do), "
    "reaping with rusage, building the result.",
    "floor is a C program with perfect knowledge (blocking waitid, kill() by pid): no "
    "Python, no discovery. 'python waitpid' is the same in Python and shows the "
    "interpreter's share.",
    "seed-poll signals the leader's process group correctly; the seed itself called "
    "killpg(-pid), which fails with EINVAL, so its real tree results are worse.",
    "asyncio uses the pidfd child watcher (the default from Python 3.12; set explicitly "
    "on older versions, whose default is a thread per child).",
    "psutil.wait_procs gives each process a 1/N s slice of a poll loop; with many "
    "processes that is a busy loop. That is psutil's documented many-process API, "
    "measured as is.",
    "S4 SIGTERM-ignoring: a SIGKILLed process cannot stamp, so the time is measured from "
    "its SIGTERM stamp + kill_wait, the earliest moment SIGKILL may be sent: an upper "
    "bound of exit-to-return that includes the stop call's own timer slack.",
    "S2/S3 children stay in the benchmark's session (so no per-dispatch session sweep); "
    "S1/S4/S5 children are session leaders. Objects a caller holds anyway (Popen, "
    "psutil.Process, DispatchResult, the monitor's watch) are made before a measured "
    "window opens; only waiting, reaping and stopping are timed.",
    "S3: floor is not a lower bound for idle CPU: a blocking waitid scans all its "
    "children on every wake, while an idle epoll set of pidfds costs nothing.",
    "S5: session containment (ours by pid, like every baseline) cannot find daemons that "
    "left both the tree and the session (setsid after a double fork; reparented to this "
    "subreaper); only keeper containment claims them (design section 5).",
    "Host memory (S6) is the Python heap seen by tracemalloc; C allocations of the "
    "native core and kernel objects (one pidfd and epoll item per dispatch) are not in "
    "it; the RSS column catches some of them, noisily.",
    "The machine may be shared: see the load averages above; rerun on a quiet machine "
    "before drawing conclusions from small differences.",
]


def render_report(
    tables: Sequence[Table],
    info: list[tuple[str, str]],
    command: str,
    bench: Optional[Bench],
    notes: Sequence[str],
    quick: bool = False,
) -> str:
    parts = [
        "# ralph-reaper benchmarks",
        "",
        "Generated by `benchmarks/run.py`; scenarios and targets are those of design "
        "section 7. Times are wall clock (CLOCK_MONOTONIC), CPU is this process's own "
        "(all threads, children excluded).",
        "",
        "Command:",
        "",
        "```sh",
        command,
        "```",
        "",
        md_table(["machine and run", ""], info),
        "",
    ]
    if quick:
        parts += [
            "**Quick mode**: sizes and repetitions are far too small for these figures to "
            "mean anything; this run only shows that every scenario works.",
            "",
        ]
    targets = [x for t in tables for x in t.targets]
    if targets:
        met = sum(1 for x in targets if x.met)
        missed = sum(1 for x in targets if x.met is False)
        parts += [
            f"## Targets: {met} met, {missed} missed, {len(targets) - met - missed} not measured",
            "",
            md_table(
                ["what", "target", "measured", ""],
                [[x.what, x.target, x.measured, met_text(x.met)] for x in targets],
            ),
            "",
        ]
        why = explain(targets)
        if why:
            parts += ["Why the missed ones are missed, as far as we know:", ""]
            parts += [f"- {line}" for line in why]
            parts.append("")
    parts += [render_table(t) for t in tables]
    extra = list(notes)
    if bench is not None:
        extra += [f"error: {e}" for e in bench.errors]
        extra += [f"left behind: {x}" for x in bench.leftovers]
    if extra:
        parts += ["## Problems seen during this run", ""]
        parts += [f"- {x}" for x in extra]
        parts.append("")
    parts += ["## How to read these figures", ""]
    parts += [f"- {x}" for x in FAIRNESS]
    return "\n".join(parts) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- main ------------------------------------------------------------------------------


class Stopped(BaseException):
    """SIGTERM/SIGHUP: like KeyboardInterrupt, not caught by a contestant's error handling."""


def _on_signal(signum: int, _frame: Optional[FrameType]) -> None:
    raise Stopped(signum)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="ralph-reaper benchmarks: scenarios S1-S8 of design section 7",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs (smoke test)")
    parser.add_argument(
        "--out", default="BENCHMARKS.md", help="report file (default BENCHMARKS.md)"
    )
    parser.add_argument(
        "--backends",
        default="",
        help="comma-separated backends of ours (default: every one available here)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated scenarios to run, e.g. S1,S4 (default: all)"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    command = "python -m benchmarks.run" + "".join(" " + shlex.quote(a) for a in raw)
    if not sys.platform.startswith("linux"):
        log("the benchmarks need Linux")
        return 2
    available = rr_backends.available()
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()] or available
    for name in wanted:
        if name not in rr_backends.NAMES:
            log(f"unknown backend {name!r}: choose from {', '.join(rr_backends.NAMES)}")
            return 2
        if name not in available:
            log(f"backend {name!r} is not available here: {rr_backends.problems().get(name)}")
            return 2
    keys = [k for k, _fn in SCENARIOS]
    only = [s.strip().upper() for s in args.only.split(",") if s.strip()] or keys
    if set(only) - set(keys):
        log(f"unknown scenario(s): {', '.join(sorted(set(only) - set(keys)))}")
        return 2

    started = time.monotonic()
    params = Params.make(args.quick)
    notes: list[str] = []
    become_subreaper()
    nofile = raise_nofile()
    fit_sizes(params, notes)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    info = [
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")),
        ("kernel", platform.release()),
        ("CPU", cpu_model()),
        ("cores", f"{os.cpu_count()} (usable here: {len(os.sched_getaffinity(0))})"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("ralph-reaper", f"{ralph_reaper.__version__}; backends run: {', '.join(wanted)}"),
        ("DispatchMonitor", "yes" if load_monitor() else "not in this build"),
        ("psutil", baselines.psutil_version() or "not installed (its rows are skipped)"),
        ("pid_max / open files", f"{read_first('/proc/sys/kernel/pid_max')} / {nofile[0]}"),
        ("load average at start", read_first("/proc/loadavg")),
        ("mode", "quick (smoke: small N, few runs)" if params.quick else "full"),
    ]
    tables: list[Table] = []
    bench: Optional[Bench] = None
    build_dir = Path(tempfile.mkdtemp(prefix="ralph-bench-build-"))
    status = 0
    try:
        stamp, floor, crowd, compiler = build(build_dir)
        info.append(("C compiler", compiler))
        bench = Bench(params, wanted, stamp, floor, log, crowd)
        keeper = keeper_row(keeper_path()) if bench.keeper else "no"
        info.insert(7, ("keeper (spawn_dispatch)", keeper))
        for key, fn in SCENARIOS:
            if key not in only:
                continue
            log(f"{key} ...")
            table = fn(bench)
            tables.append(table)
            print(render_table(table), flush=True)
    except (KeyboardInterrupt, Stopped) as exc:
        log(f"interrupted ({exc!r}); cleaning up")
        notes.append("the run was interrupted: the tables are incomplete")
        status = 130
    finally:
        if bench is not None:
            bench.close()
        left = sweep()
        if left:
            notes.append(f"{left} process(es) still running at the end were killed and reaped")
        shutil.rmtree(build_dir, ignore_errors=True)
    info.append(("load average at end", read_first("/proc/loadavg")))
    info.append(("duration", f"{time.monotonic() - started:.0f} s"))
    report = render_report(tables, info, command, bench, notes, params.quick)
    write_atomically(Path(args.out), report)
    targets = [x for t in tables for x in t.targets]
    print(
        f"targets: {sum(1 for x in targets if x.met)} met, "
        f"{sum(1 for x in targets if x.met is False)} missed; report written to {args.out}",
        flush=True,
    )
    if bench is not None and bench.errors:
        log("errors:\n  " + "\n  ".join(bench.errors))
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
