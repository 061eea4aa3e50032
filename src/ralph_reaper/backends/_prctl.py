"""``PR_SET/GET_CHILD_SUBREAPER`` through ctypes, for the backends without a C core."""

from __future__ import annotations

import ctypes
import os

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int


def _check(rc: int) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def get_child_subreaper() -> bool:
    value = ctypes.c_int(0)
    _check(_prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0))
    return value.value != 0


def set_child_subreaper(on: bool) -> None:
    _check(_prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1 if on else 0), 0, 0, 0))
