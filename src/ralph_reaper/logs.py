"""Logging that cannot take the supervisor down.

Callers hand the package whatever logger they already use: a
:class:`logging.Logger`, a :class:`logging.LoggerAdapter`, or a home-made
object that only looks like one (some have ``warn`` but no ``warning``, some
have no ``debug``, the Ralph loop's takes a ``ticket=`` keyword).
:func:`resolve_logger` wraps any of them in a :class:`LogSink` with a fixed
four-method interface, so the rest of the package never has to ask what the
caller's logger can do.

What each kind of logger is given:

* a standard-library logger (or adapter) gets what :mod:`logging` is built
  for: the format string and its ``%`` arguments unformatted (formatted only
  if a handler takes the record), ``stacklevel`` so that the record names the
  line of the package that logged it rather than this module, and ``extra``
  with the ``ticket_id``, ``session_id`` and ``pid`` of the dispatch (``None``
  when unknown), for filters and formatters;
* any other object gets one positional argument, the formatted message (the
  only calling convention every logger-like object shares), plus
  ``ticket=<ticket id>`` when its method has a ``ticket`` parameter, so a
  per-ticket logger keeps its context.

An exception raised by the underlying logger is swallowed: reaping children
and recording how they ended matters more than the log line about it, and a
broken handler (full disk, closed stream) must not turn into a leaked process
tree.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Optional

__all__ = ["DEFAULT_LOGGER_NAME", "LOG_CONTEXT_KEYS", "LogSink", "resolve_logger"]

#: Name of the standard-library logger used when the caller gives none.
DEFAULT_LOGGER_NAME = "ralph_reaper"

#: The ``extra`` keys every record from the package carries.
LOG_CONTEXT_KEYS = ("ticket_id", "session_id", "pid")

#: Frames between the package's call of a sink method and the stdlib logger
#: method: the sink method, then ``_emit``.
_STACKLEVEL = 3
#: Before Python 3.11, ``stacklevel`` also counted the adapter's own frames
#: (``LoggerAdapter.info`` and ``LoggerAdapter.log``); 3.11 skips them.
_ADAPTER_FRAMES = 0 if sys.version_info >= (3, 11) else 2

_Emit = Callable[..., object]


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


#: ``_takes_ticket`` of a method's function: a sink is made per wait, and
#: ``inspect.signature`` costs more than the rest of a short wait together.
_TICKET_PARAM: weakref.WeakKeyDictionary[Callable[..., object], bool] = weakref.WeakKeyDictionary()


def _takes_ticket(method: _Emit) -> bool:
    """Whether ``method`` has a parameter called ``ticket`` that a keyword can fill."""
    func = getattr(method, "__func__", None)
    if func is None:
        return _probe_ticket(method)
    try:
        return _TICKET_PARAM[func]
    except (KeyError, TypeError):
        pass
    takes = _probe_ticket(method)
    with contextlib.suppress(TypeError):  # not weakly referable: probe each time
        _TICKET_PARAM[func] = takes
    return takes


def _probe_ticket(method: _Emit) -> bool:
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    param = params.get("ticket")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _format(msg: str, args: tuple[Any, ...]) -> str:
    """``msg % args`` as :mod:`logging` would, never raising over a bad format."""
    if not args:
        return msg
    try:
        return msg % args
    except Exception:  # a wrong format must not cost the message
        return f"{msg} {args!r}"


class _Route:
    """How to call one method of the wrapped logger."""

    __slots__ = ("level", "method", "ticket")

    def __init__(self, method: _Emit, stdlib: bool) -> None:
        self.method = method
        # A stdlib logger is given the context in ``extra``, never ``ticket=``.
        self.ticket = False if stdlib else _takes_ticket(method)
        #: For a stdlib logger, the level of ``method``: a record the logger would
        #: drop is not built (one line per exit of thousands in a burst).
        self.level = _LEVELS.get(getattr(method, "__name__", ""), logging.NOTSET) if stdlib else 0


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _route(method: _Emit | None, stdlib: bool) -> _Route | None:
    return None if method is None else _Route(method, stdlib)


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

    Messages take ``%`` arguments, formatted lazily for stdlib loggers. A sink
    carries the context of one dispatch (:meth:`bind`); see the module
    docstring for how each kind of logger receives it. Exceptions raised by
    the wrapped method are caught and ignored.
    """

    __slots__ = (
        "_context",
        "_debug",
        "_error",
        "_info",
        "_stacklevel",
        "_stdlib",
        "_target",
        "_warning",
    )

    def __init__(self, target: object, context: Optional[Mapping[str, Any]] = None) -> None:
        self._target = target
        debug = _lookup(target, "debug")
        info = _lookup(target, "info")
        # Prefer ``warning``: on logging.Logger ``warn`` is a deprecated alias.
        warning = _first(_lookup(target, "warning"), _lookup(target, "warn"))
        error = _lookup(target, "error")
        self._stdlib = isinstance(target, (logging.Logger, logging.LoggerAdapter))
        self._debug = _route(debug, self._stdlib)
        self._info = _route(_first(info, debug), self._stdlib)
        self._warning = _route(_first(warning, error, info), self._stdlib)
        self._error = _route(_first(error, warning, info), self._stdlib)
        adapter = isinstance(target, logging.LoggerAdapter)
        self._stacklevel = _STACKLEVEL + (_ADAPTER_FRAMES if adapter else 0)
        self._context: dict[str, Any] = {key: None for key in LOG_CONTEXT_KEYS}
        if context:
            self._context.update(context)

    @property
    def target(self) -> object:
        """The wrapped logger object."""
        return self._target

    @property
    def context(self) -> dict[str, Any]:
        """The dispatch this sink speaks of: ``ticket_id``, ``session_id``, ``pid``."""
        return dict(self._context)

    def bind(self, **context: Any) -> LogSink:
        """A sink for the same logger that also names a dispatch (keys that are None
        leave what this sink already knows)."""
        sink = LogSink.__new__(LogSink)
        for name in LogSink.__slots__:
            setattr(sink, name, getattr(self, name))
        sink._context = {**self._context, **{k: v for k, v in context.items() if v is not None}}
        return sink

    def _emit(self, route: _Route | None, msg: str, args: tuple[Any, ...]) -> None:
        if route is None:
            return
        # Deliberately ignored: a failing logger must never stop supervision.
        with contextlib.suppress(Exception):
            if self._stdlib:
                if route.level and not self._target.isEnabledFor(route.level):  # type: ignore[attr-defined]
                    return
                route.method(msg, *args, stacklevel=self._stacklevel, extra=dict(self._context))
                return
            text = _format(msg, args)
            ticket = self._context.get("ticket_id")
            if route.ticket and ticket is not None:
                route.method(text, ticket=ticket)
            else:
                route.method(text)

    def debug(self, msg: str, *args: Any) -> None:
        """Log ``msg % args`` at debug level (dropped if the logger has no debug)."""
        self._emit(self._debug, msg, args)

    def info(self, msg: str, *args: Any) -> None:
        """Log ``msg % args`` at info level."""
        self._emit(self._info, msg, args)

    def warning(self, msg: str, *args: Any) -> None:
        """Log ``msg % args`` at warning level (via ``warn`` if that is all there is)."""
        self._emit(self._warning, msg, args)

    def error(self, msg: str, *args: Any) -> None:
        """Log ``msg % args`` at error level."""
        self._emit(self._error, msg, args)

    def __repr__(self) -> str:
        return f"LogSink({self._target!r})"


def resolve_logger(logger: object | None) -> LogSink:
    """Wrap the caller's logger (or the package default) in a :class:`LogSink`.

    ``None`` means the standard-library logger named ``"ralph_reaper"``, so an
    application that configures :mod:`logging` sees the package's messages
    without passing anything (and, with the package's ``NullHandler``, sees
    nothing when it configures nothing). A :class:`LogSink` is returned
    unchanged. Any other object is accepted, whatever methods it has; missing
    ones fall back as described on :class:`LogSink` instead of raising here or
    later.
    """
    if logger is None:
        return LogSink(logging.getLogger(DEFAULT_LOGGER_NAME))
    if isinstance(logger, LogSink):
        return logger
    return LogSink(logger)
