"""Tests of ralph_reaper.tracking: the dispatch tracking file."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import pytest

from ralph_reaper import tracking
from ralph_reaper.results import DispatchCompletionResult, DispatchCompletionStatus
from ralph_reaper.tracking import (
    cleanup_dispatch_tracking,
    tracking_path,
    update_dispatch_tracking_status,
)

NEW_FIELDS = (
    "status",
    "completed_at",
    "return_code",
    "duration_ms",
    "termination_method",
    "error",
    "signal",
    "core_dumped",
    "descendants_killed",
    "containment",
    "backend",
    "user_time_s",
    "system_time_s",
    "max_rss_kb",
    "stage_ms",
    "timed_out",
    "stop_reason",
)

BAD_TICKETS: list[Any] = ["../x", "a/b", "", "a\x00b", ".", "..", "/abs", 123, None, b"x"]


class RecordingLogger:
    """A logger-like object that records (level, message) pairs."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def debug(self, msg: str) -> None:
        self.records.append(("debug", msg))

    def info(self, msg: str) -> None:
        self.records.append(("info", msg))

    def warning(self, msg: str) -> None:
        self.records.append(("warning", msg))

    def error(self, msg: str) -> None:
        self.records.append(("error", msg))

    def levels(self) -> list[str]:
        return [level for level, _ in self.records]


class WarnOnlyLogger:
    """Has ``warn`` but neither ``warning`` nor ``error``."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def debug(self, msg: str) -> None:
        self.records.append(("debug", msg))

    def info(self, msg: str) -> None:
        self.records.append(("info", msg))

    def warn(self, msg: str) -> None:
        self.records.append(("warn", msg))


class WarnAndErrorLogger(WarnOnlyLogger):
    """Has ``warn`` and ``error`` but no ``warning``."""

    def error(self, msg: str) -> None:
        self.records.append(("error", msg))


class RaisingLogger:
    def __init__(self) -> None:
        self.calls = 0

    def _boom(self, msg: str) -> None:
        self.calls += 1
        raise RuntimeError("logger broken")

    debug = _boom
    info = _boom
    warning = _boom
    error = _boom


@dataclass
class OldResult:
    """A foreign result type with only the eight original fields."""

    ticket_id: str
    session_id: str
    status: Any
    return_code: int | None = None
    pid: int | None = None
    duration_ms: float = 0.0
    termination_method: str = "natural"
    error: str | None = None


class OtherStatus(Enum):
    DONE = "completed"


def make_result(**overrides: Any) -> DispatchCompletionResult:
    values: dict[str, Any] = {
        "ticket_id": "T-1",
        "session_id": "sess-1",
        "status": DispatchCompletionStatus.TERMINATED,
        "return_code": -15,
        "pid": 4242,
        "duration_ms": 1234.5,
        "termination_method": "sigterm",
        "error": None,
        "signal": 15,
        "core_dumped": False,
        "descendants_killed": 3,
        "containment": "cgroup",
        "backend": "native",
        "user_time_s": 0.25,
        "system_time_s": 0.125,
        "max_rss_kb": 20480,
        "stage_ms": {"eof": 10.0, "sigterm": 500.5},
        "timed_out": True,
    }
    values.update(overrides)
    return DispatchCompletionResult(**values)


def write_tracking(ralph_dir: Path, ticket: str, content: Any, *, raw: bool = False) -> Path:
    path = ralph_dir / "dispatch" / f"{ticket}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw:
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root``: kind, and content or link target."""
    entries: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                entries[rel] = ("file", full.read_bytes(), stat.S_IMODE(st.st_mode), st.st_ino)
    return entries


def dispatch_listing(ralph_dir: Path) -> list[str]:
    return sorted(os.listdir(ralph_dir / "dispatch"))


@pytest.fixture
def ralph_dir(tmp_path: Path) -> Path:
    path = tmp_path / "ralph"
    path.mkdir()
    return path


# --------------------------------------------------------------------------- path


def test_tracking_path(tmp_path: Path) -> None:
    assert tracking_path(tmp_path, "T-1") == tmp_path / "dispatch" / "T-1.json"
    assert tracking_path(str(tmp_path), "a.b") == tmp_path / "dispatch" / "a.b.json"


@pytest.mark.parametrize("ticket", ["..x", "x..", "...", "a b", "tf-123_x", "ü"])
def test_tracking_path_accepts_unusual_but_safe_tickets(tmp_path: Path, ticket: str) -> None:
    path = tracking_path(tmp_path, ticket)
    assert path.parent == tmp_path / "dispatch"
    assert path.name == f"{ticket}.json"


@pytest.mark.parametrize("ticket", BAD_TICKETS)
def test_tracking_path_rejects_bad_tickets(tmp_path: Path, ticket: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        tracking_path(tmp_path, ticket)


def test_tracking_path_error_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="str"):
        tracking_path(tmp_path, 123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        tracking_path(tmp_path, "")
    with pytest.raises(ValueError, match="separator"):
        tracking_path(tmp_path, "a/b")
    with pytest.raises(ValueError, match="NUL"):
        tracking_path(tmp_path, "a\x00b")
    with pytest.raises(ValueError):
        tracking_path(tmp_path, "..")


# ------------------------------------------------------------------------- update


def test_update_keeps_unknown_keys_and_adds_every_field(ralph_dir: Path) -> None:
    original = {
        "ticket_id": "T-1",
        "session_id": "sess-1",
        "pid": 4242,
        "started_at": "2024-01-01T00:00:00+00:00",
        "custom": {"nested": [1, 2, 3]},
        "status": "running",
    }
    path = write_tracking(ralph_dir, "T-1", original)
    log = RecordingLogger()

    before = datetime.now().astimezone()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)
    after = datetime.now().astimezone()

    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    for key in ("ticket_id", "session_id", "pid", "started_at", "custom"):
        assert data[key] == original[key]
    for key in NEW_FIELDS:
        assert key in data
    assert data["status"] == "terminated"
    assert data["return_code"] == -15
    assert data["duration_ms"] == 1234.5
    assert data["termination_method"] == "sigterm"
    assert data["error"] is None
    assert data["signal"] == 15
    assert data["core_dumped"] is False
    assert data["descendants_killed"] == 3
    assert data["containment"] == "cgroup"
    assert data["backend"] == "native"
    assert data["user_time_s"] == 0.25
    assert data["system_time_s"] == 0.125
    assert data["max_rss_kb"] == 20480
    assert data["stage_ms"] == {"eof": 10.0, "sigterm": 500.5}
    assert data["timed_out"] is True

    completed = datetime.strptime(data["completed_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc
    )
    assert before - timedelta(seconds=1) <= completed <= after + timedelta(seconds=1)

    # Formatting: indent=2 and a trailing newline.
    assert text == json.dumps(data, indent=2) + "\n"
    assert "info" in log.levels()
    assert "error" not in log.levels()


def test_update_is_atomic_replace(ralph_dir: Path) -> None:
    path = write_tracking(ralph_dir, "T-1", {"status": "running"})
    ino_before = path.stat().st_ino

    update_dispatch_tracking_status(ralph_dir, "T-1", make_result())

    assert path.stat().st_ino != ino_before
    assert dispatch_listing(ralph_dir) == ["T-1.json"]
    json.loads(path.read_text(encoding="utf-8"))


def test_update_twice_keeps_the_file_valid(ralph_dir: Path) -> None:
    path = write_tracking(ralph_dir, "T-1", {"status": "running", "x": 1})
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result())
    update_dispatch_tracking_status(
        ralph_dir, "T-1", make_result(status=DispatchCompletionStatus.COMPLETED, return_code=0)
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["status"] == "completed"
    assert data["return_code"] == 0
    assert data["x"] == 1
    assert dispatch_listing(ralph_dir) == ["T-1.json"]


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o644])
def test_update_keeps_permission_bits(ralph_dir: Path, mode: int) -> None:
    path = write_tracking(ralph_dir, "T-1", {"status": "running"})
    path.chmod(mode)
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result())
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_completed_at_is_written_as_upstream_writes_it(ralph_dir: Path) -> None:
    # UTC, whole seconds, a literal Z: what readers of the old module's files parse.
    path = write_tracking(ralph_dir, "T-1", {"status": "running"})
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result())
    stamp = json.loads(path.read_text())["completed_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp), stamp


@pytest.mark.parametrize("length", [237, 250])
def test_update_works_for_the_longest_valid_tickets(ralph_dir: Path, length: int) -> None:
    # "<ticket>.json" is a valid name up to 255 bytes: the temp file must fit as well.
    ticket = "t" * length
    path = write_tracking(ralph_dir, ticket, {"status": "running"})
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, ticket, make_result(), logger=log)
    assert "error" not in log.levels(), log.records
    assert json.loads(path.read_text())["status"] == "terminated"
    assert dispatch_listing(ralph_dir) == [path.name]


def test_update_keeps_the_owner_of_the_file(ralph_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root (CAP_CHOWN)")
    path = write_tracking(ralph_dir, "T-1", {"status": "running"})
    os.chown(path, 1000, 1000)
    path.chmod(0o600)
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o600)
    assert json.loads(path.read_text())["status"] == "terminated"
    assert "error" not in log.levels()


def test_update_leaves_the_file_when_its_owner_cannot_be_kept(
    ralph_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root (CAP_CHOWN)")
    content = b'{"status": "running"}\n'
    path = write_tracking(ralph_dir, "T-1", content, raw=True)
    os.chown(path, 1000, 1000)
    ino = path.stat().st_ino

    def refuse(*args: Any) -> None:
        # Mocked: the EPERM a supervisor that is not root gets for another
        # user's file (this test needs root to make such a file at all).
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refuse)
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)
    monkeypatch.undo()
    assert path.read_bytes() == content
    assert path.stat().st_ino == ino
    assert dispatch_listing(ralph_dir) == ["T-1.json"]
    assert "error" in log.levels()


def test_update_leaves_a_file_too_large_to_be_a_tracking_file(ralph_dir: Path) -> None:
    # Valid JSON, one byte past the cap: not read, not replaced.
    content = b'{"status": "running"}' + b" " * (tracking.MAX_TRACKING_BYTES - 20)
    assert len(content) == tracking.MAX_TRACKING_BYTES + 1
    path = write_tracking(ralph_dir, "T-1", content, raw=True)
    ino = path.stat().st_ino
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)
    assert path.stat().st_ino == ino
    assert path.read_bytes() == content
    assert [level for level, msg in log.records if "bytes" in msg] == ["error"]


def test_update_of_a_huge_sparse_file_reads_none_of_it(ralph_dir: Path) -> None:
    path = write_tracking(ralph_dir, "T-1", b"", raw=True)
    with open(path, "r+b") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: costs no disk
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)
    assert path.stat().st_size == 1 << 30
    assert [level for level, msg in log.records if "bytes" in msg] == ["error"]


def test_update_missing_file_creates_nothing(ralph_dir: Path) -> None:
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)
    assert not (ralph_dir / "dispatch").exists()
    assert os.listdir(ralph_dir) == []
    assert log.levels() == ["debug"]


def test_update_missing_ralph_dir_creates_nothing(tmp_path: Path) -> None:
    update_dispatch_tracking_status(tmp_path / "nope", "T-1", make_result())
    assert os.listdir(tmp_path) == []


def test_update_missing_file_in_existing_dispatch_dir(ralph_dir: Path) -> None:
    (ralph_dir / "dispatch").mkdir()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result())
    assert dispatch_listing(ralph_dir) == []


@pytest.mark.parametrize(
    "content",
    [
        b'{"a": 1,',
        b"[1, 2, 3]\n",
        b'"just a string"',
        b"null",
        b"42",
        b"",
        b"\x80\x81 not utf-8",
        b"[" * 100000,
    ],
    ids=["truncated", "list", "string", "null", "number", "empty", "bad-utf8", "deep"],
)
def test_update_leaves_non_object_content_untouched(ralph_dir: Path, content: bytes) -> None:
    path = write_tracking(ralph_dir, "T-1", content, raw=True)
    ino = path.stat().st_ino
    log = RecordingLogger()

    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)

    assert path.read_bytes() == content
    assert path.stat().st_ino == ino
    assert dispatch_listing(ralph_dir) == ["T-1.json"]
    assert "error" in log.levels()
    assert "info" not in log.levels()


def test_update_corrupt_file_with_warn_only_logger(ralph_dir: Path) -> None:
    content = b'{"a": 1,'
    path = write_tracking(ralph_dir, "T-1", content, raw=True)
    log = WarnOnlyLogger()

    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)

    assert path.read_bytes() == content
    # No error() and no warning(): the error is reported through warn().
    assert [level for level, _ in log.records] == ["warn"]
    assert str(path) in log.records[0][1]


def test_update_corrupt_file_with_warn_and_error_logger(ralph_dir: Path) -> None:
    content = b"[1]"
    path = write_tracking(ralph_dir, "T-1", content, raw=True)
    log = WarnAndErrorLogger()

    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)

    assert path.read_bytes() == content
    assert [level for level, _ in log.records] == ["error"]


def test_update_does_not_follow_symlink(tmp_path: Path, ralph_dir: Path) -> None:
    outside = tmp_path / "outside.json"
    outside_content = b'{"secret": true}\n'
    outside.write_bytes(outside_content)
    outside.chmod(0o600)
    (ralph_dir / "dispatch").mkdir()
    link = ralph_dir / "dispatch" / "T-1.json"
    link.symlink_to(outside)
    outside_ino = outside.stat().st_ino
    log = RecordingLogger()

    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)

    assert outside.read_bytes() == outside_content
    assert outside.stat().st_ino == outside_ino
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    assert link.is_symlink()
    assert os.readlink(link) == str(outside)
    assert dispatch_listing(ralph_dir) == ["T-1.json"]
    assert "error" in log.levels()


def test_update_dangling_symlink_is_left_alone(tmp_path: Path, ralph_dir: Path) -> None:
    (ralph_dir / "dispatch").mkdir()
    link = ralph_dir / "dispatch" / "T-1.json"
    target = tmp_path / "does-not-exist.json"
    link.symlink_to(target)
    log = RecordingLogger()

    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)

    assert link.is_symlink()
    assert not target.exists()
    assert "error" in log.levels()


def test_update_directory_in_place_of_file(ralph_dir: Path) -> None:
    (ralph_dir / "dispatch" / "T-1.json").mkdir(parents=True)
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)
    assert (ralph_dir / "dispatch" / "T-1.json").is_dir()
    assert "error" in log.levels()


def test_update_fifo_in_place_of_file_does_not_hang(ralph_dir: Path) -> None:
    (ralph_dir / "dispatch").mkdir()
    fifo = ralph_dir / "dispatch" / "T-1.json"
    os.mkfifo(fifo)
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert dispatch_listing(ralph_dir) == ["T-1.json"]
    assert "error" in log.levels()


def test_update_opens_with_o_nofollow(ralph_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tracking(ralph_dir, "T-1", {"status": "running"})
    flags_seen: list[int] = []
    real_open = os.open

    def spy_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("T-1.json"):
            flags_seen.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result())
    assert flags_seen
    assert all(flags & os.O_NOFOLLOW for flags in flags_seen)


@pytest.mark.parametrize("ticket", BAD_TICKETS)
def test_update_bad_ticket_raises_and_touches_nothing(
    tmp_path: Path, ralph_dir: Path, ticket: Any
) -> None:
    # Files a traversal could reach, if validation were missing.
    write_tracking(ralph_dir, "T-1", {"status": "running"})
    (ralph_dir / "x.json").write_text('{"status": "running"}\n')
    (ralph_dir / "dispatch" / "a").mkdir()
    (ralph_dir / "dispatch" / "a" / "b.json").write_text('{"status": "running"}\n')
    before = snapshot(tmp_path)
    log = RecordingLogger()

    with pytest.raises((ValueError, TypeError)):
        update_dispatch_tracking_status(ralph_dir, ticket, make_result(), logger=log)

    assert snapshot(tmp_path) == before


def test_update_non_str_ticket_is_type_error(ralph_dir: Path) -> None:
    with pytest.raises(TypeError):
        update_dispatch_tracking_status(ralph_dir, 123, make_result())  # type: ignore[arg-type]
    assert os.listdir(ralph_dir) == []


def test_update_with_raising_logger(ralph_dir: Path) -> None:
    path = write_tracking(ralph_dir, "T-1", {"status": "running"})
    log = RaisingLogger()

    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)

    assert json.loads(path.read_text())["status"] == "terminated"
    assert log.calls >= 1


def test_update_with_raising_logger_on_error_paths(ralph_dir: Path) -> None:
    content = b'{"a": 1,'
    path = write_tracking(ralph_dir, "T-1", content, raw=True)
    log = RaisingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)
    update_dispatch_tracking_status(ralph_dir, "missing", make_result(), logger=log)
    assert path.read_bytes() == content
    assert log.calls == 2


def test_update_with_logger_adapter(ralph_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_tracking(ralph_dir, "T-1", {"status": "running"})
    adapter = logging.LoggerAdapter(logging.getLogger("test_tracking.adapter"), {})

    with caplog.at_level(logging.DEBUG, logger="test_tracking.adapter"):
        update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=adapter)
        update_dispatch_tracking_status(ralph_dir, "gone", make_result(), logger=adapter)

    assert json.loads(path.read_text())["status"] == "terminated"
    levels = [r.levelno for r in caplog.records if r.name == "test_tracking.adapter"]
    assert levels == [logging.INFO, logging.DEBUG]


def test_update_default_logger(ralph_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_tracking(ralph_dir, "T-1", b"[]", raw=True)
    with caplog.at_level(logging.DEBUG, logger="ralph_reaper"):
        update_dispatch_tracking_status(ralph_dir, "T-1", make_result())
    assert path.read_bytes() == b"[]"
    assert any(r.name == "ralph_reaper" and r.levelno == logging.ERROR for r in caplog.records)


def test_update_foreign_result_with_str_status(ralph_dir: Path) -> None:
    path = write_tracking(ralph_dir, "T-1", {"status": "running", "keep": "me"})
    result = OldResult(
        ticket_id="T-1",
        session_id="s",
        status="completed",
        return_code=0,
        pid=1,
        duration_ms=12.5,
        termination_method="natural",
        error=None,
    )

    update_dispatch_tracking_status(ralph_dir, "T-1", result)

    data = json.loads(path.read_text())
    assert data["keep"] == "me"
    assert data["status"] == "completed"
    assert data["return_code"] == 0
    assert data["duration_ms"] == 12.5
    assert data["termination_method"] == "natural"
    assert data["error"] is None
    for key in NEW_FIELDS:
        assert key in data
    assert data["signal"] is None
    assert data["core_dumped"] is False
    assert data["descendants_killed"] == 0
    assert data["stage_ms"] == {}
    assert data["timed_out"] is False
    assert data["user_time_s"] is None
    assert data["max_rss_kb"] is None


def test_update_foreign_result_derives_signal_and_timeout(ralph_dir: Path) -> None:
    path = write_tracking(ralph_dir, "T-1", {})
    result = OldResult("T-1", "s", "timeout", return_code=-9, termination_method="sigkill")

    update_dispatch_tracking_status(ralph_dir, "T-1", result)

    data = json.loads(path.read_text())
    assert data["status"] == "timeout"
    assert data["signal"] == 9
    assert data["timed_out"] is True


def test_update_foreign_result_with_foreign_enum_status(ralph_dir: Path) -> None:
    path = write_tracking(ralph_dir, "T-1", {})
    update_dispatch_tracking_status(ralph_dir, "T-1", OldResult("T-1", "s", OtherStatus.DONE))
    assert json.loads(path.read_text())["status"] == "completed"


def test_update_unserialisable_result_leaves_file(ralph_dir: Path) -> None:
    content = b'{"status": "running"}\n'
    path = write_tracking(ralph_dir, "T-1", content, raw=True)
    result = OldResult("T-1", "s", "error", error=object())  # type: ignore[arg-type]
    log = RecordingLogger()

    update_dispatch_tracking_status(ralph_dir, "T-1", result, logger=log)

    assert path.read_bytes() == content
    assert dispatch_listing(ralph_dir) == ["T-1.json"]
    assert "error" in log.levels()


def test_update_non_finite_floats_become_null(ralph_dir: Path) -> None:
    path = write_tracking(ralph_dir, "T-1", {})
    result = make_result(duration_ms=float("nan"), user_time_s=float("inf"))
    update_dispatch_tracking_status(ralph_dir, "T-1", result)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["duration_ms"] is None
    assert data["user_time_s"] is None


def test_update_to_dict_failure_is_logged(ralph_dir: Path) -> None:
    class Broken:
        def to_dict(self) -> dict[str, Any]:
            raise RuntimeError("nope")

    content = b'{"status": "running"}\n'
    path = write_tracking(ralph_dir, "T-1", content, raw=True)
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", Broken(), logger=log)
    assert path.read_bytes() == content
    assert "error" in log.levels()


@pytest.mark.parametrize("failing", ["replace", "fsync", "fchmod", "write"])
def test_update_io_failure_removes_temp_and_logs(
    ralph_dir: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    content = b'{"status": "running"}\n'
    path = write_tracking(ralph_dir, "T-1", content, raw=True)
    ino = path.stat().st_ino

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "simulated I/O error")

    monkeypatch.setattr(os, failing, fail)
    log = RecordingLogger()

    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)

    monkeypatch.undo()
    assert path.read_bytes() == content
    assert path.stat().st_ino == ino
    assert dispatch_listing(ralph_dir) == ["T-1.json"]
    assert "error" in log.levels()
    assert "info" not in log.levels()


def test_update_mkstemp_failure_is_logged(ralph_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content = b'{"status": "running"}\n'
    path = write_tracking(ralph_dir, "T-1", content, raw=True)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "simulated")

    monkeypatch.setattr(tempfile, "mkstemp", fail)
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)
    monkeypatch.undo()

    assert path.read_bytes() == content
    assert dispatch_listing(ralph_dir) == ["T-1.json"]
    assert "error" in log.levels()


def test_update_interrupt_during_write_removes_temp(
    ralph_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = b'{"status": "running"}\n'
    path = write_tracking(ralph_dir, "T-1", content, raw=True)

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        update_dispatch_tracking_status(ralph_dir, "T-1", make_result())
    monkeypatch.undo()

    assert path.read_bytes() == content
    assert dispatch_listing(ralph_dir) == ["T-1.json"]


def test_update_directory_fsync_failure_is_only_a_warning(
    ralph_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tracking(ralph_dir, "T-1", {"status": "running"})

    def fail(directory: Path) -> None:
        raise OSError(22, "simulated: fsync not supported on directories")

    monkeypatch.setattr(tracking, "_fsync_dir", fail)
    log = RecordingLogger()
    update_dispatch_tracking_status(ralph_dir, "T-1", make_result(), logger=log)

    assert json.loads(path.read_text())["status"] == "terminated"
    assert log.levels() == ["warning", "info"]


# ------------------------------------------------------------------------ cleanup


def test_cleanup_removes_file(ralph_dir: Path) -> None:
    path = write_tracking(ralph_dir, "T-1", {"status": "completed"})
    write_tracking(ralph_dir, "T-2", {"status": "running"})
    log = RecordingLogger()

    cleanup_dispatch_tracking(ralph_dir, "T-1", logger=log)

    assert not path.exists()
    assert dispatch_listing(ralph_dir) == ["T-2.json"]
    assert log.levels() == ["info"]


def test_cleanup_missing_is_noop(ralph_dir: Path) -> None:
    log = RecordingLogger()
    cleanup_dispatch_tracking(ralph_dir, "T-1", logger=log)
    assert os.listdir(ralph_dir) == []
    assert log.levels() == ["debug"]

    (ralph_dir / "dispatch").mkdir()
    cleanup_dispatch_tracking(ralph_dir, "T-1", logger=log)
    assert dispatch_listing(ralph_dir) == []


def test_cleanup_removes_symlink_not_target(tmp_path: Path, ralph_dir: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_bytes(b'{"keep": true}\n')
    (ralph_dir / "dispatch").mkdir()
    link = ralph_dir / "dispatch" / "T-1.json"
    link.symlink_to(outside)

    cleanup_dispatch_tracking(ralph_dir, "T-1")

    assert not link.is_symlink()
    assert not link.exists()
    assert outside.read_bytes() == b'{"keep": true}\n'


def test_cleanup_other_oserror_is_logged(ralph_dir: Path) -> None:
    (ralph_dir / "dispatch" / "T-1.json").mkdir(parents=True)
    log = RecordingLogger()
    cleanup_dispatch_tracking(ralph_dir, "T-1", logger=log)
    assert (ralph_dir / "dispatch" / "T-1.json").is_dir()
    assert log.levels() == ["error"]


def test_cleanup_with_raising_logger(ralph_dir: Path) -> None:
    path = write_tracking(ralph_dir, "T-1", {})
    cleanup_dispatch_tracking(ralph_dir, "T-1", logger=RaisingLogger())
    cleanup_dispatch_tracking(ralph_dir, "T-1", logger=RaisingLogger())
    assert not path.exists()


@pytest.mark.parametrize("ticket", BAD_TICKETS)
def test_cleanup_bad_ticket_raises_and_touches_nothing(
    tmp_path: Path, ralph_dir: Path, ticket: Any
) -> None:
    write_tracking(ralph_dir, "T-1", {"status": "running"})
    (ralph_dir / "x.json").write_text("{}\n")
    (ralph_dir / "dispatch" / "a").mkdir()
    (ralph_dir / "dispatch" / "a" / "b.json").write_text("{}\n")
    before = snapshot(tmp_path)

    with pytest.raises((ValueError, TypeError)):
        cleanup_dispatch_tracking(ralph_dir, ticket)

    assert snapshot(tmp_path) == before
