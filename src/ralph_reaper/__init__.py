"""ralph-reaper: know the instant a dispatch session ends, stop it gracefully, leave nothing.

The first group of names is a drop-in for ``tf.ralph_completion`` (and
``tf.ralph.DispatchResult``): same names, fields, parameters and defaults.
"""

from __future__ import annotations

import logging

from .backends import BackendUnavailableError, backend_info
from .completion import (
    graceful_terminate_dispatch,
    poll_dispatch_status,
    wait_for_dispatch_completion,
)
from .monitor import DispatchMonitor
from .results import DispatchCompletionResult, DispatchCompletionStatus, DispatchResult
from .spawning import spawn_dispatch
from .tracking import cleanup_dispatch_tracking, update_dispatch_tracking_status

__version__ = "0.1.0"

# A library stays silent unless the application configures logging.
logging.getLogger("ralph_reaper").addHandler(logging.NullHandler())

__all__ = [
    "BackendUnavailableError",
    "DispatchCompletionResult",
    "DispatchCompletionStatus",
    "DispatchMonitor",
    "DispatchResult",
    "__version__",
    "backend_info",
    "cleanup_dispatch_tracking",
    "graceful_terminate_dispatch",
    "poll_dispatch_status",
    "spawn_dispatch",
    "update_dispatch_tracking_status",
    "wait_for_dispatch_completion",
]
