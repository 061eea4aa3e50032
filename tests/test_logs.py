"""Tests of ralph_reaper.logs: any logger-like object, never an exception."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from ralph_reaper.logs import DEFAULT_LOGGER_NAME, LOG_CONTEXT_KEYS, LogSink, resolve_logger


class Recorder:
    """Records every call as (method name, args, kwargs)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _record(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls.append((name, args, kwargs))


class FullLogger(Recorder):
    def debug(self, *args: Any, **kwargs: Any) -> None:
        self._record("debug", args, kwargs)

    def info(self, *args: Any, **kwargs: Any) -> None:
        self._record("info", args, kwargs)

    def warning(self, *args: Any, **kwargs: Any) -> None:
        self._record("warning", args, kwargs)

    def warn(self, *args: Any, **kwargs: Any) -> None:
        self._record("warn", args, kwargs)

    def error(self, *args: Any, **kwargs: Any) -> None:
        self._record("error", args, kwargs)


class WarnOnlyLogger(Recorder):
    """debug/info/error and ``warn``, but no ``warning``."""

    def debug(self, *args: Any, **kwargs: Any) -> None:
        self._record("debug", args, kwargs)

    def info(self, *args: Any, **kwargs: Any) -> None:
        self._record("info", args, kwargs)

    def warn(self, *args: Any, **kwargs: Any) -> None:
        self._record("warn", args, kwargs)

    def error(self, *args: Any, **kwargs: Any) -> None:
        self._record("error", args, kwargs)


class InfoWarnLogger(Recorder):
    """Only ``info`` and ``warn``."""

    def info(self, *args: Any, **kwargs: Any) -> None:
        self._record("info", args, kwargs)

    def warn(self, *args: Any, **kwargs: Any) -> None:
        self._record("warn", args, kwargs)


class InfoOnlyLogger(Recorder):
    def info(self, *args: Any, **kwargs: Any) -> None:
        self._record("info", args, kwargs)


class DebugOnlyLogger(Recorder):
    def debug(self, *args: Any, **kwargs: Any) -> None:
        self._record("debug", args, kwargs)


class ErrorOnlyLogger(Recorder):
    def error(self, *args: Any, **kwargs: Any) -> None:
        self._record("error", args, kwargs)


class RaisingLogger:
    def __init__(self) -> None:
        self.attempts = 0

    def _fail(self, msg: str) -> None:
        self.attempts += 1
        raise RuntimeError("logging is broken")

    debug = _fail
    info = _fail
    warning = _fail
    error = _fail


class NonCallableAttrs(Recorder):
    debug = "not a method"
    warning = None

    def info(self, *args: Any, **kwargs: Any) -> None:
        self._record("info", args, kwargs)

    def error(self, *args: Any, **kwargs: Any) -> None:
        self._record("error", args, kwargs)


class ExplodingAttributes:
    """Every attribute lookup of a logging method raises."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no {name} for you")


def _names(logger: Recorder) -> list[str]:
    return [name for name, _, _ in logger.calls]


def test_full_logger_each_level_goes_to_its_method() -> None:
    logger = FullLogger()
    sink = resolve_logger(logger)
    sink.debug("d")
    sink.info("i")
    sink.warning("w")
    sink.error("e")
    assert logger.calls == [
        ("debug", ("d",), {}),
        ("info", ("i",), {}),
        ("warning", ("w",), {}),
        ("error", ("e",), {}),
    ]


def test_warning_is_preferred_over_warn() -> None:
    logger = FullLogger()
    resolve_logger(logger).warning("w")
    assert _names(logger) == ["warning"]


def test_warn_only_logger_gets_warnings_via_warn() -> None:
    logger = WarnOnlyLogger()
    sink = resolve_logger(logger)
    sink.warning("careful")
    sink.error("bad")
    assert logger.calls == [("warn", ("careful",), {}), ("error", ("bad",), {})]


def test_missing_error_falls_back_to_warn() -> None:
    logger = InfoWarnLogger()
    sink = resolve_logger(logger)
    sink.error("bad")
    sink.debug("dropped")
    sink.info("i")
    assert logger.calls == [("warn", ("bad",), {}), ("info", ("i",), {})]


def test_info_only_logger() -> None:
    logger = InfoOnlyLogger()
    sink = resolve_logger(logger)
    sink.debug("d")
    sink.info("i")
    sink.warning("w")
    sink.error("e")
    # debug is dropped, warnings and errors still reach the caller.
    assert logger.calls == [
        ("info", ("i",), {}),
        ("info", ("w",), {}),
        ("info", ("e",), {}),
    ]


def test_debug_only_logger_never_promotes_to_higher_levels() -> None:
    logger = DebugOnlyLogger()
    sink = resolve_logger(logger)
    sink.debug("d")
    sink.info("i")
    sink.warning("w")
    sink.error("e")
    # info may go down to debug; warnings/errors have nowhere sensible to go.
    assert logger.calls == [("debug", ("d",), {}), ("debug", ("i",), {})]


def test_error_only_logger_gets_warnings() -> None:
    logger = ErrorOnlyLogger()
    sink = resolve_logger(logger)
    sink.debug("d")
    sink.info("i")
    sink.warning("w")
    sink.error("e")
    assert logger.calls == [("error", ("w",), {}), ("error", ("e",), {})]


def test_object_without_methods_is_silently_accepted() -> None:
    sink = resolve_logger(object())
    sink.debug("d")
    sink.info("i")
    sink.warning("w")
    sink.error("e")


def test_non_callable_attributes_are_treated_as_missing() -> None:
    logger = NonCallableAttrs()
    sink = resolve_logger(logger)
    sink.debug("d")
    sink.warning("w")
    assert logger.calls == [("error", ("w",), {})]


def test_attribute_lookup_that_raises_is_treated_as_missing() -> None:
    sink = resolve_logger(ExplodingAttributes())
    sink.debug("d")
    sink.info("i")
    sink.warning("w")
    sink.error("e")


def test_raising_logger_methods_are_swallowed() -> None:
    logger = RaisingLogger()
    sink = resolve_logger(logger)
    sink.debug("d")
    sink.info("i")
    sink.warning("w")
    sink.error("e")
    assert logger.attempts == 4


def test_none_uses_package_logger(caplog: pytest.LogCaptureFixture) -> None:
    sink = resolve_logger(None)
    assert sink.target is logging.getLogger(DEFAULT_LOGGER_NAME)
    assert DEFAULT_LOGGER_NAME == "ralph_reaper"
    with caplog.at_level(logging.DEBUG, logger=DEFAULT_LOGGER_NAME):
        sink.debug("d")
        sink.info("i")
        sink.warning("w")
        sink.error("e")
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert records == [
        ("ralph_reaper", logging.DEBUG, "d"),
        ("ralph_reaper", logging.INFO, "i"),
        ("ralph_reaper", logging.WARNING, "w"),
        ("ralph_reaper", logging.ERROR, "e"),
    ]


def test_stdlib_logger_message_with_percent_is_not_formatted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test_logs.percent")
    sink = resolve_logger(logger)
    with caplog.at_level(logging.INFO, logger="test_logs.percent"):
        sink.info("100% done, %s %d left as is")
    assert [r.getMessage() for r in caplog.records] == ["100% done, %s %d left as is"]


def test_logger_adapter(caplog: pytest.LogCaptureFixture) -> None:
    adapter = logging.LoggerAdapter(logging.getLogger("test_logs.adapter"), {"extra": 1})
    sink = resolve_logger(adapter)
    with caplog.at_level(logging.DEBUG, logger="test_logs.adapter"):
        sink.debug("d")
        sink.warning("w")
        sink.error("e")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "d"),
        (logging.WARNING, "w"),
        (logging.ERROR, "e"),
    ]


def test_log_sink_is_returned_unchanged() -> None:
    sink = LogSink(FullLogger())
    assert resolve_logger(sink) is sink


def test_failing_stdlib_handler_does_not_raise() -> None:
    class BrokenHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise OSError("disk full")

        def handleError(self, record: logging.LogRecord) -> None:
            raise OSError("still full")

    logger = logging.getLogger("test_logs.broken")
    logger.propagate = False
    handler = BrokenHandler()
    logger.addHandler(handler)
    try:
        resolve_logger(logger).error("e")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


# --------------------------------------------------------------------------------------
# What stdlib loggers get: lazy arguments, the caller's location, the dispatch's context


def test_stdlib_records_keep_arguments_lazy_and_point_at_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test_logs.lazy")
    sink = resolve_logger(logger)
    with caplog.at_level(logging.INFO, logger="test_logs.lazy"):
        sink.info("stopping %s after %d ms", "pt-1", 250)
    (record,) = caplog.records
    assert (record.msg, record.args) == ("stopping %s after %d ms", ("pt-1", 250))
    assert record.getMessage() == "stopping pt-1 after 250 ms"
    assert record.pathname == __file__  # not logs.py
    assert record.funcName == "test_stdlib_records_keep_arguments_lazy_and_point_at_the_caller"


def test_arguments_are_not_formatted_for_a_disabled_level() -> None:
    class Counted:
        calls = 0

        def __str__(self) -> str:
            Counted.calls += 1
            return "counted"

    logger = logging.getLogger("test_logs.disabled")
    logger.setLevel(logging.ERROR)
    try:
        resolve_logger(logger).info("value %s", Counted())
    finally:
        logger.setLevel(logging.NOTSET)
    assert Counted.calls == 0


def test_adapter_records_point_at_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    adapter = logging.LoggerAdapter(logging.getLogger("test_logs.where"), {})
    with caplog.at_level(logging.INFO, logger="test_logs.where"):
        resolve_logger(adapter).warning("w %d", 1)
    (record,) = caplog.records
    assert (record.pathname, record.getMessage()) == (__file__, "w 1")


def test_records_carry_the_dispatch_context(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_logs.extra")
    sink = resolve_logger(logger)
    bound = sink.bind(ticket_id="pt-7", session_id="s-7", pid=4242)
    with caplog.at_level(logging.INFO, logger="test_logs.extra"):
        sink.info("unbound")
        bound.info("bound")
        bound.bind(pid=None).info("rebound")  # None keeps what was known
    contexts = [(r.ticket_id, r.session_id, r.pid) for r in caplog.records]  # type: ignore[attr-defined]
    assert contexts == [(None, None, None), ("pt-7", "s-7", 4242), ("pt-7", "s-7", 4242)]
    assert sink.context == dict.fromkeys(LOG_CONTEXT_KEYS)
    assert bound.target is logger


# --------------------------------------------------------------------------------------
# What other loggers get: the formatted message, and ticket= when they take it


class TicketLogger:
    """Like the Ralph loop's logger: each method takes a ``ticket=`` keyword."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def info(self, msg: str, ticket: Any = None) -> None:
        self.calls.append(("info", msg, ticket))

    def warn(self, msg: str, *, ticket: Any = None) -> None:
        self.calls.append(("warn", msg, ticket))

    def error(self, msg: str, ticket: Any = None, **extra: Any) -> None:
        self.calls.append(("error", msg, ticket))


def test_a_logger_that_takes_ticket_gets_the_ticket_id() -> None:
    logger = TicketLogger()
    sink = resolve_logger(logger).bind(ticket_id="pt-9", pid=12)
    sink.info("waiting for %s", "pt-9")
    sink.warning("slow")
    sink.error("gone: %d", 3)
    sink.debug("dropped: no debug method")
    assert logger.calls == [
        ("info", "waiting for pt-9", "pt-9"),
        ("warn", "slow", "pt-9"),
        ("error", "gone: 3", "pt-9"),
    ]


def test_no_ticket_keyword_when_the_ticket_is_unknown() -> None:
    logger = TicketLogger()
    resolve_logger(logger).info("no dispatch yet")
    assert logger.calls == [("info", "no dispatch yet", None)]


def test_plain_loggers_get_one_formatted_argument() -> None:
    logger = FullLogger()
    sink = resolve_logger(logger).bind(ticket_id="pt-1")
    sink.info("a %s b %d", "x", 2)
    sink.warning("100%")  # no arguments: never formatted
    sink.error("bad %d format", "not a number")  # a broken format still gets through
    assert logger.calls == [
        ("info", ("a x b 2",), {}),
        ("warning", ("100%",), {}),
        ("error", ("bad %d format ('not a number',)",), {}),
    ]
