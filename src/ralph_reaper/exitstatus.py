"""One decoded exit: the raw wait status and what it means in ``subprocess`` terms."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .backends.base import Rusage


@dataclass(frozen=True)
class ExitStatus:
    """A wait status in ``waitpid`` encoding, plus rusage when the backend had it."""

    status: int
    rusage: Optional[Rusage] = None

    @property
    def signal(self) -> Optional[int]:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    @property
    def return_code(self) -> int:
        """``subprocess`` convention: the exit status, or ``-N`` for death by signal N."""
        sig = self.signal
        return -sig if sig is not None else os.WEXITSTATUS(self.status)

    @property
    def core_dumped(self) -> bool:
        return os.WIFSIGNALED(self.status) and os.WCOREDUMP(self.status)
