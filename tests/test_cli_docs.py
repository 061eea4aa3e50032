"""The generated man page and bash completion cover the whole command line.

They are generated from the parser, so these tests check what generation
could get wrong: every command and every option is in them, bash accepts the
script and completes from it, and the roff is well formed where a formatter
is installed. No process tree is involved: one run, not one per backend.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import procs
from ralph_reaper.cli import build_parser
from ralph_reaper.cli_args import run_option_words
from ralph_reaper.cli_docs import bash_completion, man_page

COMMANDS = ["run", "watch", "doctor", "bench", "man", "completion"]


def _cli(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ralph_reaper", *words],
        capture_output=True,
        text=True,
        env=procs.child_env(),
        timeout=60,
    )


def test_the_man_page_names_every_command_and_option() -> None:
    page = _cli("man")
    assert page.returncode == 0, page.stderr
    text = page.stdout.replace("\\-", "-")
    for command in COMMANDS:
        assert f".SS {command}" in text
    for word in [*run_option_words(), "--timeout", "--count", "--exited"]:
        assert word in text, word
    assert page.stdout == man_page(build_parser())


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed: no roff check")
def test_the_man_page_is_well_formed_roff() -> None:
    done = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z"],
        input=man_page(build_parser()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr


def _complete(script: str, line: list[str]) -> list[str]:
    """What bash completes for the last word of ``line`` with ``script`` loaded."""
    words = " ".join(f"'{w}'" for w in line)
    probe = (
        f"{script}\n"
        f"COMP_WORDS=({words}); COMP_CWORD={len(line) - 1}\n"
        "_ralph_reaper\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completes_commands_and_options() -> None:
    generated = _cli("completion", "bash")
    assert generated.returncode == 0, generated.stderr
    script = generated.stdout
    assert script == bash_completion(build_parser())
    assert set(_complete(script, ["ralph-reaper", ""])) >= set(COMMANDS)
    assert _complete(script, ["ralph-reaper", "run", "--ti"]) == ["--timeout", "--ticket"]
    assert "--exited" in _complete(script, ["ralph-reaper", "watch", "--ex"])
    assert "--json" in _complete(script, ["ralph-reaper", "doctor", "--"])


def test_completion_wants_a_known_shell() -> None:
    done = _cli("completion", "tcsh")
    assert done.returncode == 125
    assert "invalid choice" in done.stderr
