"""ralph-reaper: know the instant a dispatch session ends, stop it gracefully, leave nothing.

The first group of names is a drop-in for ``tf.ralph_completion`` (and
``tf.ralph.DispatchResult``): same names, fields, parameters and defaults.
:class:`Popen` is the drop-in for the loop's launcher: ``subprocess.Popen``,
with the command under a keeper.
"""

from __future__ import annotations

import logging

from .backends import BackendInfo, BackendUnavailableError, KernelFeatures, backend_info
from .completion import (
    graceful_terminate_dispatch,
    poll_dispatch_status,
    wait_for_dispatch_completion,
)
from .monitor import DispatchMonitor
from .popen import Popen
from .results import (
    DispatchCompletionResult,
    DispatchCompletionStatus,
    DispatchLike,
    DispatchResult,
    LoggerLike,
    StdinMode,
)
from .spawning import spawn_dispatch
from .tracking import cleanup_dispatch_tracking, update_dispatch_tracking_status

__version__ = "0.1.0"

# A library stays silent unless the application configures logging.
logging.getLogger("ralph_reaper").addHandler(logging.NullHandler())

__all__ = [
    "BackendInfo",
    "BackendUnavailableError",
    "DispatchCompletionResult",
    "DispatchCompletionStatus",
    "DispatchLike",
    "DispatchMonitor",
    "DispatchResult",
    "KernelFeatures",
    "LoggerLike",
    "Popen",
    "StdinMode",
    "__version__",
    "backend_info",
    "cleanup_dispatch_tracking",
    "graceful_terminate_dispatch",
    "poll_dispatch_status",
    "spawn_dispatch",
    "update_dispatch_tracking_status",
    "wait_for_dispatch_completion",
]
