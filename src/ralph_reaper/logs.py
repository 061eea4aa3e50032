"""Logging that cannot take the supervisor down.

Callers hand the package whatever logger they already use: a
:class:`logging.Logger`, a :class:`logging.LoggerAdapter`, or a home-made
object that only looks like one (some have ``warn`` but no ``warning``, some
have no ``debug``). :func:`resolve_logger` wraps any of them in a
:class:`LogSink` with a fixed four-method interface, so the rest of the package
never has to ask what the caller's logger can do.

Two rules hold for every message:

* the underlying method is called with exactly one positional argument, the
  already formatted message, because that is the only calling convention every
  logger-like object shares (``%``-style arguments and keyword arguments such as
  ``exc_info`` are specific to :mod:`logging`);
* an exception raised by the underlying logger is swallowed: reaping children
  and recording how they ended matters more than the log line about it, and a
  broken handler (full disk, closed stream) must not turn into a leaked process
  tree.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

__all__ = ["DEFAULT_LOGGER_NAME", "LogSink", "resolve_logger"]

#: Name of the standard-library logger used when the caller gives none.
DEFAULT_LOGGER_NAME = "ralph_reaper"

_Emit = Callable[[str], object]


def _lookup(target: object, name: str) -> _Emit | None:
    """Return ``target.name`` if it is callable, else None.

    Attribute access itself is guarded: a proxy or a property may raise, and
    that must count as "no such method" rather than an error.
    """
    try:
        method = getattr(target, name, None)
    except Exception:
        return None
    if method is None or not callable(method):
        return None
    emit: _Emit = method
    return emit


def _first(*candidates: _Emit | None) -> _Emit | None:
    """The first candidate that is not None."""
    for candidate in candidates:
        if candidate is not None:
            return candidate
    return None


class LogSink:
    """A logger with exactly ``debug``, ``info``, ``warning`` and ``error``.

    Each method forwards the message to the method the wrapped object has for
    that level, or to a neighbouring level when it lacks one:

    * ``debug``: ``debug``, otherwise dropped (debug output is optional by
      nature, so promoting it would only add noise);
    * ``info``: ``info``, otherwise ``debug``, otherwise dropped (routine
      messages are never promoted to warnings);
    * ``warning``: ``warning``, otherwise ``warn``, otherwise ``error``,
      otherwise ``info``;
    * ``error``: ``error``, otherwise ``warning``/``warn``, otherwise ``info``
      (an error should reach the caller at whatever level it can still see).

    Exceptions raised by the wrapped method are caught and ignored; see the
    module docstring for why.
    """

    __slots__ = ("_debug", "_error", "_info", "_target", "_warning")

    def __init__(self, target: object) -> None:
        self._target = target
        debug = _lookup(target, "debug")
        info = _lookup(target, "info")
        # Prefer ``warning``: on logging.Logger ``warn`` is a deprecated alias.
        warning = _first(_lookup(target, "warning"), _lookup(target, "warn"))
        error = _lookup(target, "error")
        self._debug = debug
        self._info = _first(info, debug)
        self._warning = _first(warning, error, info)
        self._error = _first(error, warning, info)

    @property
    def target(self) -> object:
        """The wrapped logger object."""
        return self._target

    @staticmethod
    def _emit(method: _Emit | None, msg: str) -> None:
        if method is None:
            return
        # Deliberately ignored: a failing logger must never stop supervision.
        with contextlib.suppress(Exception):
            method(msg)

    def debug(self, msg: str) -> None:
        """Log ``msg`` at debug level (dropped if the logger has no debug)."""
        self._emit(self._debug, msg)

    def info(self, msg: str) -> None:
        """Log ``msg`` at info level."""
        self._emit(self._info, msg)

    def warning(self, msg: str) -> None:
        """Log ``msg`` at warning level (via ``warn`` if that is all there is)."""
        self._emit(self._warning, msg)

    def error(self, msg: str) -> None:
        """Log ``msg`` at error level."""
        self._emit(self._error, msg)

    def __repr__(self) -> str:
        return f"LogSink({self._target!r})"


def resolve_logger(logger: object | None) -> LogSink:
    """Wrap the caller's logger (or the package default) in a :class:`LogSink`.

    ``None`` means the standard-library logger named ``"ralph_reaper"``, so an
    application that configures :mod:`logging` sees the package's messages
    without passing anything. A :class:`LogSink` is returned unchanged. Any
    other object is accepted, whatever methods it has; missing ones fall back
    as described on :class:`LogSink` instead of raising here or later.
    """
    if logger is None:
        return LogSink(logging.getLogger(DEFAULT_LOGGER_NAME))
    if isinstance(logger, LogSink):
        return logger
    return LogSink(logger)
