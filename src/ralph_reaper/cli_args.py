"""The words of the command line: durations, signals, pids, and ``run``'s options.

``run`` is parsed here by hand rather than by argparse because it must read
its arguments the way coreutils ``timeout`` does: options up to the first
word that is not one, then an optional DURATION, then the command, whose own
options are never taken for ours. Every mistake is a :class:`UsageError`,
which the command line turns into exit status 125 (``timeout``'s own errors).
"""

from __future__ import annotations

import math
import re
import signal
from dataclasses import dataclass, field
from typing import Optional

_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# ASCII only: str.isdigit and float() would take full-width or other digits.
_DURATION = re.compile(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(ms|s|m|h|d|)", re.ASCII)
_PID = re.compile(r"[0-9]+", re.ASCII)

#: Signals that cannot end a stop sequence's first stage in any useful way.
_NOT_A_STOP = {
    0,
    int(signal.SIGSTOP),
    int(signal.SIGTSTP),
    int(signal.SIGTTIN),
    int(signal.SIGTTOU),
}


class UsageError(Exception):
    """A mistake on the command line; nothing has been started."""


def parse_duration(text: str) -> float:
    """Seconds from ``timeout``'s spelling (``10``, ``1.5m``, ``2h``, ``1d``) plus ``500ms``."""
    match = _DURATION.fullmatch(text)
    if not match:
        if text.startswith("-") and _DURATION.fullmatch(text[1:]):
            raise UsageError(f"invalid duration {text!r}: it must not be negative")
        raise UsageError(
            f"invalid duration {text!r}: use a number of seconds, optionally with a unit "
            "ms, s, m, h or d (e.g. 500ms, 10s, 1.5m)"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if math.isinf(seconds) or math.isnan(seconds):
        raise UsageError(f"invalid duration {text!r}: too large")
    return seconds


def parse_signal(text: str) -> int:
    """A signal number from ``TERM``, ``SIGTERM``, ``term`` or ``15``, as ``timeout -s`` takes."""
    word = text.strip().upper()
    number: Optional[int] = None
    if _PID.fullmatch(word):
        number = int(word)
    else:
        name = word if word.startswith("SIG") else "SIG" + word
        member = getattr(signal.Signals, "__members__", {}).get(name)
        if member is not None:
            number = int(member)
    valid = set(signal.valid_signals())
    if number is None or number not in valid:
        raise UsageError(f"invalid signal {text!r}: use a name such as TERM, INT, KILL or a number")
    if number in _NOT_A_STOP:
        raise UsageError(f"invalid signal {text!r}: it cannot end a process")
    return number


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def parse_pid(text: str) -> int:
    """A pid written in ASCII digits only (no sign, no blanks, no other scripts' digits)."""
    if not _PID.fullmatch(text):
        raise UsageError(f"invalid pid {text!r}: use a positive number in ASCII digits")
    pid = int(text)
    if pid <= 0 or pid > 2**22:
        raise UsageError(f"invalid pid {text!r}: out of range")
    return pid


#: Where the JSON report goes: stderr by default, "-" stdout, else a path.
STDERR = ""
STDOUT = "-"


@dataclass
class RunOptions:
    """What ``run`` was asked to do."""

    timeout_s: float = 0.0
    stop_signal: int = int(signal.SIGTERM)
    kill_after_s: float = 5.0
    preserve_status: bool = False
    foreground: bool = False
    eof_wait_s: float = 0.0
    idle_timeout_s: float = 0.0
    #: None: no JSON report; :data:`STDERR`, :data:`STDOUT` or a path.
    json: Optional[str] = None
    exit_file: Optional[str] = None
    ticket: str = "run"
    quiet: bool = False
    verbose: bool = False
    help: bool = False
    command: list[str] = field(default_factory=list)


# name -> (takes a value, attribute)
_LONG: dict[str, tuple[bool, str]] = {
    "timeout": (True, "timeout_s"),
    "signal": (True, "stop_signal"),
    "kill-after": (True, "kill_after_s"),
    "grace": (True, "kill_after_s"),
    "preserve-status": (False, "preserve_status"),
    "foreground": (False, "foreground"),
    "eof-wait": (True, "eof_wait_s"),
    "idle-timeout": (True, "idle_timeout_s"),
    "json": (False, "json"),
    "exit-file": (True, "exit_file"),
    "ticket": (True, "ticket"),
    "quiet": (False, "quiet"),
    "verbose": (False, "verbose"),
    "help": (False, "help"),
}
_SHORT = {"s": "signal", "k": "kill-after", "q": "quiet", "v": "verbose", "h": "help"}


def run_option_words() -> list[str]:
    """Every option ``run`` takes, as typed (for generated completion)."""
    return [f"-{letter}" for letter in _SHORT] + [f"--{name}" for name in _LONG]


def _long_name(word: str) -> str:
    """The option a ``--word`` names: exact, or the one option it abbreviates (getopt_long)."""
    if word in _LONG:
        return word
    matches = sorted({_LONG[n][1] for n in _LONG if n.startswith(word)})
    names = [n for n in _LONG if n.startswith(word)]
    if len(matches) == 1 and names:
        return names[0]
    if names:
        raise UsageError(f"option '--{word}' is ambiguous: " + ", ".join("--" + n for n in names))
    raise UsageError(f"unknown option '--{word}'")


def _set(opts: RunOptions, name: str, value: Optional[str], seen: set[str]) -> None:
    takes, attr = _LONG[name]
    if name == "json":
        opts.json = STDERR if value is None else value
        if value == "":
            raise UsageError("--json= wants a target: '-' for stdout or a file path")
        return
    if not takes:
        if value is not None:
            raise UsageError(f"option '--{name}' takes no value")
        setattr(opts, attr, True)
        return
    assert value is not None
    seen.add(attr)
    if attr == "stop_signal":
        opts.stop_signal = parse_signal(value)
    elif attr in ("exit_file", "ticket"):
        if not value:
            raise UsageError(f"option '--{name}' wants a non-empty value")
        setattr(opts, attr, value)
    else:
        setattr(opts, attr, parse_duration(value))


def parse_run(argv: list[str], opts: Optional[RunOptions] = None) -> RunOptions:
    """``run [OPTION]... [DURATION] [--] COMMAND [ARG]...``; raises :class:`UsageError`.

    ``opts`` is filled as parsing goes, so that a caller still knows where a
    JSON report was asked for when a later word is wrong.
    """
    opts = RunOptions() if opts is None else opts
    seen: set[str] = set()
    i = 0
    dashdash = False
    while i < len(argv):
        word = argv[i]
        if word == "--":
            dashdash = True
            i += 1
            break
        if word.startswith("--"):
            body = word[2:]
            name, eq, inline = body.partition("=")
            name = _long_name(name)
            value: Optional[str] = inline if eq else None
            if _LONG[name][0] and value is None:
                if i + 1 >= len(argv):
                    raise UsageError(f"option '--{name}' needs a value")
                i += 1
                value = argv[i]
            _set(opts, name, value, seen)
            i += 1
            continue
        if word.startswith("-") and len(word) > 1:
            j = 1
            while j < len(word):
                letter = word[j]
                if letter not in _SHORT:
                    raise UsageError(f"unknown option '-{letter}'")
                name = _SHORT[letter]
                if _LONG[name][0]:
                    value = word[j + 1 :]
                    if not value:
                        if i + 1 >= len(argv):
                            raise UsageError(f"option '-{letter}' needs a value")
                        i += 1
                        value = argv[i]
                    _set(opts, name, value, seen)
                    break
                _set(opts, name, None, seen)
                j += 1
            i += 1
            continue
        break
    if opts.help:
        return opts
    rest = argv[i:]
    if not dashdash and rest and "timeout_s" not in seen:
        opts.timeout_s = parse_duration(rest[0])
        rest = rest[1:]
        if rest and rest[0] == "--":
            rest = rest[1:]
    if not rest:
        raise UsageError("no command given")
    opts.command = rest
    return opts
