"""The /proc and prctl half of a backend, shared by the two without a C core."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from . import _prctl, procfs
from .base import ProcStat


class StdlibProcOps:
    """Process-table reads in Python and the subreaper flag through ctypes."""

    def proc_stat(self, pid: int) -> Optional[ProcStat]:
        return procfs.proc_stat(pid)

    def descendants(self, roots: Sequence[int]) -> list[int]:
        return procfs.descendants(roots)

    def session_members(self, sid: int) -> list[int]:
        return procfs.session_members(sid)

    def get_child_subreaper(self) -> bool:
        return _prctl.get_child_subreaper()

    def set_child_subreaper(self, on: bool) -> None:
        _prctl.set_child_subreaper(on)
