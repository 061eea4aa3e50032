"""Result types of the drop-in API.

Names, field order and defaults of the first fields are those of
``tf.ralph_completion`` and ``tf.ralph.DispatchResult``, so code that builds or
unpacks them positionally keeps working. Every field added here comes after the
old ones and has a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Optional, Protocol

#: What :func:`ralph_reaper.spawn_dispatch` gives the command as its stdin.
StdinMode = Literal["pipe", "pty", "devnull", "inherit"]


class DispatchLike(Protocol):
    """What the drop-in functions read from a dispatch result: any object with these.

    ``tf.ralph.DispatchResult``, this package's :class:`DispatchResult`, or a
    loop's own record all fit; a bare pid does not (the old module took the
    result, not the pid, and a type checker should say so).
    """

    @property
    def pid(self) -> Optional[int]: ...

    @property
    def session_id(self) -> Optional[str]: ...


class LoggerLike(Protocol):
    """The least a logger must have: ``info`` taking a message.

    The package also uses ``debug``, ``warning`` (or ``warn``) and ``error``
    when they exist, and a ``ticket=`` keyword when the methods take one.
    """

    def info(self, msg: str, /) -> object: ...


class DispatchCompletionStatus(Enum):
    """How a dispatch session ended (or that it has not yet)."""

    RUNNING = "running"
    COMPLETED = "completed"
    TIMEOUT = "timeout"
    TERMINATED = "terminated"
    ERROR = "error"


@dataclass
class DispatchCompletionResult:
    """What :func:`wait_for_dispatch_completion` learned about one dispatch.

    ``return_code`` follows :mod:`subprocess`: the exit status, or ``-N`` when
    signal N ended the process. ``termination_method`` is ``"natural"`` when the
    package did not stop the process, else the stage that stopped it
    (``"eof"``, ``"sigterm"``, ``"sigkill"``) or ``"failed"``.
    """

    ticket_id: str
    session_id: str
    status: DispatchCompletionStatus
    return_code: Optional[int] = None
    pid: Optional[int] = None
    duration_ms: float = 0.0
    termination_method: str = "natural"
    error: Optional[str] = None
    # Fields below are new; each has a default so positional use stays compatible.
    signal: Optional[int] = None
    core_dumped: bool = False
    descendants_killed: int = 0
    containment: str = "session"
    backend: str = ""
    user_time_s: Optional[float] = None
    system_time_s: Optional[float] = None
    max_rss_kb: Optional[int] = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    timed_out: bool = False
    #: Why the package stopped it: "timeout", "idle", or None when it did not.
    stop_reason: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (the status as its string value)."""
        return {
            "ticket_id": self.ticket_id,
            "session_id": self.session_id,
            "status": self.status.value,
            "return_code": self.return_code,
            "pid": self.pid,
            "duration_ms": self.duration_ms,
            "termination_method": self.termination_method,
            "error": self.error,
            "signal": self.signal,
            "core_dumped": self.core_dumped,
            "descendants_killed": self.descendants_killed,
            "containment": self.containment,
            "backend": self.backend,
            "user_time_s": self.user_time_s,
            "system_time_s": self.system_time_s,
            "max_rss_kb": self.max_rss_kb,
            "stage_ms": dict(self.stage_ms),
            "timed_out": self.timed_out,
            "stop_reason": self.stop_reason,
        }


@dataclass
class DispatchResult:
    """A launched (or failed) dispatch, with the fields of ``tf.ralph.DispatchResult``."""

    session_id: str
    ticket_id: str
    status: str
    pid: Optional[int] = None
    error: Optional[str] = None
