"""What the command-line tests share: running the CLI and ``timeout``, and the documented schema.

The JSON schema is read from ``docs/cli.md`` itself, so a key that is
reported but not documented (or documented with another type) fails a test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
CLI = [sys.executable, "-m", "ralph_reaper"]
RUN = [*CLI, "run"]


def env_for(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env["RALPH_REAPER_BACKEND"] = backend
    return env


def run_cli(
    backend: str, *args: str, stdin: Any = subprocess.DEVNULL, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=env_for(backend),
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def timeout_path() -> str:
    found = shutil.which("timeout")
    if found is None:
        pytest.skip("coreutils timeout is not installed: nothing to compare with")
    return found


#: Runs ``timeout`` as a child subreaper and reaps what it orphans: ``timeout -s KILL``
#: kills its own process group, itself included, and its command's remains would
#: otherwise come back to the test process. Ends as ``timeout`` ended.
_SUBREAPER = """
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
child = subprocess.Popen(sys.argv[1:])
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(sig, lambda n, _f: child.send_signal(n))
code = child.wait()
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
if code < 0:
    if -code != signal.SIGKILL:
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def timeout_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", _SUBREAPER, timeout_path(), *args]


def run_timeout(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        timeout_argv(*args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def _doc_table(heading: str, until: str) -> dict[str, str]:
    text = DOCS.read_text()
    section = text[text.index(heading) : text.index(until, text.index(heading))]
    keys: dict[str, str] = {}
    for line in section.splitlines():
        match = re.match(r"^\| `([a-z_]+)` \| ([^|]+) \|", line)
        if match:
            keys[match.group(1)] = match.group(2).strip()
    return keys


def run_schema() -> dict[str, str]:
    return _doc_table("### The JSON report", "## `watch`")


def watch_schema() -> dict[str, str]:
    return _doc_table("Each JSON object:", "## `doctor`")


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "number": (int, float),
    "string": (str,),
    "bool": (bool,),
    "object": (dict,),
    "list of strings": (list,),
}


def _matches(value: Any, spec: str) -> bool:
    nullable = spec.endswith("or null")
    base = spec.replace(", or null", "").replace(" or null", "").strip()
    if value is None:
        return nullable
    types = _TYPES[base]
    if isinstance(value, bool) and bool not in types:
        return False
    if not isinstance(value, types):
        return False
    return base != "list of strings" or all(isinstance(v, str) for v in value)


def check_record(record: Any, schema: dict[str, str]) -> dict[str, Any]:
    """The record has exactly the documented keys, each of its documented type."""
    assert isinstance(record, dict)
    assert set(record) == set(schema), set(record) ^ set(schema)
    for key, spec in schema.items():
        assert _matches(record[key], spec), (key, record[key], spec)
    assert record["schema"] == 1
    return record


def check_run_record(text: str) -> dict[str, Any]:
    """The last line of ``text`` is a valid ``run`` report."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no JSON report"
    return check_record(json.loads(lines[-1]), run_schema())


def status_of(returncode: int) -> int:
    """What a shell shows as ``$?``: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def read_file(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def test_the_documented_schemas_are_read() -> None:
    """The docs tables themselves parse (else every schema check would be vacuous)."""
    assert {"schema", "exit_status", "status", "stop_reason"} <= set(run_schema())
    assert {"schema", "pid", "learned"} <= set(watch_schema())
