"""The ``ralph-reaper`` command line: one entry point, one module per command.

``run`` (:mod:`.cli_run`) is coreutils ``timeout`` for process trees, ``watch``
(:mod:`.cli_watch`) is util-linux ``waitpid``, ``doctor`` (:mod:`.cli_doctor`)
describes the machine. Usage errors exit 125 everywhere, as ``timeout``'s own
errors do, and always print the usage of the command that was mistyped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

from . import __version__
from .backends import BackendUnavailableError
from .cli_args import parse_duration
from .cli_docs import bash_completion, man_page
from .cli_doctor import add_parser as add_doctor
from .cli_report import emit
from .cli_run import EXIT_LAUNCHER, cmd_run
from .cli_watch import add_parser as add_watch
from .cli_watch import spell_json

__all__ = ["build_parser", "main", "parse_duration"]


class _Parser(argparse.ArgumentParser):
    """argparse with ``timeout``'s status for usage errors (125), not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        emit(f"{self.prog}: error: {message}", sys.stderr)
        sys.exit(EXIT_LAUNCHER)


def _source_root() -> Optional[Path]:
    """The repository root when the package runs from a source checkout (``src/`` layout)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks" / "run.py").is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite; it lives beside the package, not in it."""
    root = _source_root()
    if root is None:
        print(
            "ralph-reaper: the benchmarks are not part of the installed package; run them "
            "from a source checkout of ralph-reaper:\n"
            "  pip install -e . && python -m benchmarks.run [--quick] [--out BENCHMARKS.md]",
            file=sys.stderr,
        )
        return EXIT_LAUNCHER
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import importlib

    runner: Any = importlib.import_module("benchmarks.run")
    argv = ["--out", args.out]
    if args.quick:
        argv.append("--quick")
    if args.backends:
        argv += ["--backends", args.backends]
    if args.only:
        argv += ["--only", args.only]
    return int(runner.main(argv))


def build_parser() -> argparse.ArgumentParser:
    """The command line but ``run``'s options, which :mod:`.cli_args` reads as ``timeout`` does."""
    parser = _Parser(
        prog="ralph-reaper",
        description="Supervise process trees: exact exit reporting, graceful stop, no leftovers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sub.add_parser(
        "run",
        add_help=False,
        help="run a command like timeout(1), stop its whole tree, report how it ended "
        "(ralph-reaper run --help)",
    )
    add_watch(sub)
    add_doctor(sub)
    bench = sub.add_parser(
        "bench",
        help="run the benchmarks (from a source checkout)",
        description="Run benchmarks/run.py: scenarios S1-S6 for every backend and baseline, "
        "printed as tables and written to --out.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes, few runs (a smoke test)")
    bench.add_argument("--out", default="BENCHMARKS.md", metavar="FILE", help="report file")
    bench.add_argument("--backends", default="", metavar="LIST", help="comma-separated")
    bench.add_argument("--only", default="", metavar="LIST", help="scenarios, e.g. S1,S4")
    bench.set_defaults(func=cmd_bench, parser=bench)
    man = sub.add_parser("man", help="print the man page, generated from this parser (roff)")
    man.set_defaults(func=lambda _args: _print(man_page(build_parser())), parser=man)
    completion = sub.add_parser(
        "completion", help="print a shell completion script, generated from this parser"
    )
    completion.add_argument("shell", choices=["bash"], help="the shell to complete in")
    completion.set_defaults(
        func=lambda _args: _print(bash_completion(build_parser())), parser=completion
    )
    return parser


def _print(text: str) -> int:
    emit(text.rstrip("\n"), sys.stdout)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] == "run":
        return cmd_run(words[1:])
    if words and words[0] == "watch":
        words = spell_json(words)
    parser = build_parser()
    args, extra = parser.parse_known_args(words)
    if extra:
        sub: Any = getattr(args, "parser", parser)
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    func: Any = args.func
    try:
        return int(func(args))
    except BackendUnavailableError as exc:
        emit(f"ralph-reaper: {exc}", sys.stderr)
        return EXIT_LAUNCHER


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
