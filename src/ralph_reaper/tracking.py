"""The per-dispatch tracking file: ``<ralph_dir>/dispatch/<ticket>.json``.

Whoever launches a dispatch writes this file; this module only records how the
dispatch ended (:func:`update_dispatch_tracking_status`) and removes the file
afterwards (:func:`cleanup_dispatch_tracking`).

The file lives in a directory other tools (and agents) write to, so the code is
defensive about what it finds there:

* the ticket is validated before it becomes a path component, so a ticket
  such as ``"../x"`` can never address a file outside ``dispatch/``;
* a symlink is never followed: updating through it could overwrite any file
  the supervisor can write;
* a file that is not a JSON object is left byte-for-byte as it is, because
  replacing it would destroy whatever someone may still want to inspect;
* the update is atomic (temporary file in the same directory, ``fsync``,
  ``os.replace``, ``fsync`` of the directory), so a reader sees either the old
  record or the new one, never a half-written file, even across a crash;
* the new file keeps the owner, group and permission bits of the old one: a
  supervisor running as root must not take a user's file away from them; when
  they cannot be kept, the file is left as it is;
* the temporary file has a short name of its own, not one derived from the
  ticket: a ticket long enough to be a valid file name would otherwise give a
  temporary name longer than NAME_MAX;
* a file larger than :data:`MAX_TRACKING_BYTES` is not read (a sparse or
  runaway file must not exhaust memory) and is left untouched.

I/O problems are logged, not raised: the tracking file is bookkeeping, and
failing to update it must not stop the supervisor from reaping processes. A bad
ticket, on the other hand, is a programming error and raises before anything on
disk is touched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from .logs import LogSink, resolve_logger

__all__ = [
    "cleanup_dispatch_tracking",
    "tracking_path",
    "update_dispatch_tracking_status",
]

_DISPATCH_DIR = "dispatch"

#: Tracking files are a few hundred bytes; anything past this is not one.
MAX_TRACKING_BYTES = 4 * 1024 * 1024

#: ``completed_at`` as the module this package replaces wrote it: UTC, whole
#: seconds, a literal ``Z`` (readers of the tracking files parse exactly that).
_COMPLETED_AT_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)

# Fields written from the completion result, in file order, with the value used
# when a result object (e.g. an older, foreign result type) does not have them.
# ``status`` and ``completed_at`` are handled separately.
_RESULT_FIELDS: tuple[tuple[str, Any], ...] = (
    ("return_code", None),
    ("duration_ms", None),
    ("termination_method", None),
    ("error", None),
    ("signal", None),
    ("core_dumped", False),
    ("descendants_killed", 0),
    ("containment", None),
    ("backend", None),
    ("user_time_s", None),
    ("system_time_s", None),
    ("max_rss_kb", None),
    ("stage_ms", None),
    ("timed_out", None),
    ("stop_reason", None),
)

_MISSING = object()


def _validate_ticket(ticket: object) -> str:
    """Return ``ticket`` if it is safe as a single file-name component.

    Raises TypeError for a non-string and ValueError for anything that is
    empty, contains a path separator or NUL, or is ``.``/``..``.
    """
    if not isinstance(ticket, str):
        raise TypeError(f"ticket must be a str, not {type(ticket).__name__}")
    if not ticket:
        raise ValueError("ticket must not be empty")
    if "\x00" in ticket:
        raise ValueError(f"ticket must not contain NUL: {ticket!r}")
    separators = {"/", os.sep}
    if os.altsep:
        separators.add(os.altsep)
    if any(sep in ticket for sep in separators):
        raise ValueError(f"ticket must not contain a path separator: {ticket!r}")
    if ticket in (".", ".."):
        raise ValueError(f"ticket must not be {ticket!r}")
    return ticket


def tracking_path(ralph_dir: str | os.PathLike[str], ticket: str) -> Path:
    """Path of the tracking file of ``ticket``: ``<ralph_dir>/dispatch/<ticket>.json``.

    The ticket is validated first (see module docstring); TypeError or
    ValueError is raised for one that could name a different file.
    """
    name = _validate_ticket(ticket)
    return Path(ralph_dir) / _DISPATCH_DIR / f"{name}.json"


def _status_value(status: object) -> object:
    """The JSON form of a status: an Enum's value, anything else as given."""
    if isinstance(status, Enum):
        return status.value
    return status


def _finite(value: object) -> object:
    """Replace NaN/infinity by None: they are not valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _completion_fields(result: object) -> dict[str, Any]:
    """The fields to record, from ``result.to_dict()`` or its attributes.

    A result object that predates the newer fields (only ``status``,
    ``return_code``, ``duration_ms``, ``termination_method``, ``error`` and the
    ids) still works: missing fields get neutral defaults, and ``signal`` and
    ``timed_out`` are derived where the old fields imply them (a return code
    of ``-N`` means signal N; status ``"timeout"`` means it timed out).
    """
    source: Mapping[str, Any] = {}
    to_dict = getattr(result, "to_dict", None)
    if callable(to_dict):
        produced = to_dict()
        if isinstance(produced, Mapping):
            source = produced

    def pick(name: str) -> Any:
        if name in source:
            return source[name]
        return getattr(result, name, _MISSING)

    status = pick("status")
    fields: dict[str, Any] = {
        "status": None if status is _MISSING else _status_value(status),
        "completed_at": datetime.now(timezone.utc).strftime(_COMPLETED_AT_FORMAT),
    }
    for name, default in _RESULT_FIELDS:
        value = pick(name)
        fields[name] = default if value is _MISSING else value

    return_code = fields["return_code"]
    if (
        fields["signal"] is None
        and isinstance(return_code, int)
        and not isinstance(return_code, bool)
        and return_code < 0
    ):
        fields["signal"] = -return_code
    if fields["timed_out"] is None:
        fields["timed_out"] = fields["status"] == "timeout"
    stage_ms = fields["stage_ms"]
    if stage_ms is None:
        fields["stage_ms"] = {}
    elif isinstance(stage_ms, Mapping):
        fields["stage_ms"] = {str(key): _finite(value) for key, value in stage_ms.items()}
    for name in ("duration_ms", "user_time_s", "system_time_s"):
        fields[name] = _finite(fields[name])
    return fields


def _read_existing(path: Path, log: LogSink) -> tuple[bytes, os.stat_result] | None:
    """Read the tracking file without following a symlink.

    Returns its bytes and its stat (owner and permission bits are kept), or
    None (after logging) when there is nothing that may be updated.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        log.debug(f"no dispatch tracking file at {path}; nothing to update")
        return None
    except OSError as exc:
        log.error(f"cannot stat dispatch tracking file {path}: {exc}")
        return None
    if stat.S_ISLNK(st.st_mode):
        log.error(f"dispatch tracking file {path} is a symlink; refusing to follow it")
        return None
    if not stat.S_ISREG(st.st_mode):
        log.error(f"dispatch tracking file {path} is not a regular file; left untouched")
        return None

    try:
        # O_NONBLOCK: if the file was swapped for a FIFO after the lstat, the
        # open must not hang; the fstat below then rejects it.
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK)
    except FileNotFoundError:
        log.debug(f"dispatch tracking file {path} disappeared; nothing to update")
        return None
    except OSError as exc:
        # ELOOP here means it was swapped for a symlink after the lstat.
        log.error(f"cannot open dispatch tracking file {path}: {exc}")
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.error(f"dispatch tracking file {path} is not a regular file; left untouched")
            return None
        if st.st_size > MAX_TRACKING_BYTES:
            log.error(
                f"dispatch tracking file {path} is {st.st_size} bytes, more than a tracking "
                f"file can be ({MAX_TRACKING_BYTES}); left untouched"
            )
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            # Bounded even if the file grows after the fstat.
            chunk = os.read(fd, min(65536, MAX_TRACKING_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_TRACKING_BYTES:
                log.error(
                    f"dispatch tracking file {path} grew past {MAX_TRACKING_BYTES} bytes "
                    "while being read; left untouched"
                )
                return None
    except OSError as exc:
        log.error(f"cannot read dispatch tracking file {path}: {exc}")
        return None
    finally:
        os.close(fd)
    return b"".join(chunks), st


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(
    path: Path, payload: bytes, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Replace ``path`` by a file holding ``payload`` with permission bits ``mode``.

    The temporary file is created next to ``path`` (``os.replace`` is only
    atomic within one file system) under a short name of its own (one built
    from ``path.name`` would exceed NAME_MAX for a long but valid name), and
    removed again if anything fails. ``owner`` (uid, gid) is given to it
    before the rename; if that is not permitted the OSError is raised and
    ``path`` is untouched. Raises OSError; the caller logs it.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".rr-", suffix=".tmp")
    fd_open = True
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if owner is not None:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != owner:
                os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        os.fsync(fd)
        fd_open = False
        os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:
        if fd_open:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def write_json_file(
    path: Path, record: Mapping[str, Any], mode: int = 0o644, *, one_line: bool = False
) -> None:
    """Write ``record`` to ``path`` atomically and durably (the exit files of ``run``
    and of ``spawn_dispatch``; ``one_line``: as the keeper writes its own).

    A regular file already at ``path`` keeps its owner, group and permission
    bits (``mode`` is for a new file). Raises OSError, TypeError or
    ValueError; nothing is left at ``path`` but the complete old file or the
    complete new one.
    """
    text = json.dumps(record) if one_line else json.dumps(record, indent=2)
    payload = (text + "\n").encode("utf-8")
    owner: tuple[int, int] | None = None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISREG(st.st_mode):
            mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    _write_atomically(path, payload, mode, owner)
    _fsync_dir(path.parent)


def update_dispatch_tracking_status(
    ralph_dir: str | os.PathLike[str],
    ticket: str,
    completion_result: object,
    logger: object | None = None,
) -> None:
    """Record how a dispatch ended in its existing tracking file.

    Keeps every key already in the file and sets ``status`` (the string
    value), ``completed_at`` (UTC, whole seconds, ``Z``: as upstream), ``return_code``,
    ``duration_ms``, ``termination_method``, ``error``, ``signal``,
    ``core_dumped``, ``descendants_killed``, ``containment``, ``backend``,
    ``user_time_s``, ``system_time_s``, ``max_rss_kb``, ``stage_ms`` and
    ``timed_out``.

    ``completion_result`` is normally a
    :class:`~ralph_reaper.results.DispatchCompletionResult`, but any object
    with the old fields works (its ``status`` may be an Enum or a str).

    Nothing is created when the file does not exist (the dispatch was not
    tracked). A symlink, a non-regular file, or content that is not a JSON
    object is left untouched and an error is logged. Other failures are logged
    too, and so is a file larger than :data:`MAX_TRACKING_BYTES` (left
    untouched, unread) or one whose owner cannot be kept (left untouched);
    only an invalid ``ticket`` raises (TypeError/ValueError), before any file
    is touched.
    """
    path = tracking_path(ralph_dir, ticket)
    log = resolve_logger(logger)

    try:
        fields = _completion_fields(completion_result)
    except Exception as exc:
        log.error(f"cannot read completion result for ticket {ticket!r}: {exc!r}")
        return

    existing = _read_existing(path, log)
    if existing is None:
        return
    raw, st = existing

    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers both JSONDecodeError and UnicodeDecodeError.
        log.error(f"dispatch tracking file {path} is not valid JSON ({exc}); left untouched")
        return
    if not isinstance(record, dict):
        log.error(
            f"dispatch tracking file {path} holds a JSON {type(record).__name__}, "
            "not an object; left untouched"
        )
        return
    record.update(fields)

    try:
        payload = (json.dumps(record, indent=2) + "\n").encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        log.error(f"cannot serialise dispatch tracking record for {path}: {exc}")
        return

    try:
        _write_atomically(path, payload, stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid))
    except OSError as exc:
        log.error(f"cannot update dispatch tracking file {path}: {exc}")
        return

    try:
        _fsync_dir(path.parent)
    except OSError as exc:
        # The new content is in place; only its durability across a crash is
        # in doubt, so this is not reported as a failed update.
        log.warning(f"updated {path} but could not fsync its directory: {exc}")

    log.info(f"dispatch tracking file {path} updated: status={fields['status']}")


def cleanup_dispatch_tracking(
    ralph_dir: str | os.PathLike[str],
    ticket: str,
    logger: object | None = None,
) -> None:
    """Remove the tracking file of ``ticket`` if it exists.

    A symlink is removed as a link; whatever it points to is not touched.
    A missing file is not an error. Other OSErrors are logged, not raised; an
    invalid ``ticket`` raises TypeError/ValueError before anything is touched.
    """
    path = tracking_path(ralph_dir, ticket)
    log = resolve_logger(logger)
    try:
        os.unlink(path)
    except FileNotFoundError:
        log.debug(f"no dispatch tracking file at {path}; nothing to clean up")
        return
    except OSError as exc:
        log.error(f"cannot remove dispatch tracking file {path}: {exc}")
        return
    log.info(f"dispatch tracking file {path} removed")
