"""Backend selection: native if it imported, else pure if pidfds work, else polling.

``RALPH_REAPER_BACKEND=native|pure|polling`` forces one; forcing one that
cannot work here raises :class:`BackendUnavailableError` saying why, rather
than silently running with weaker guarantees.
"""

from __future__ import annotations

import importlib
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, TypedDict

from .base import Backend

NAMES = ("native", "pure", "polling")
ENV_VAR = "RALPH_REAPER_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine."""


class KernelFeatures(TypedDict):
    """What the running kernel offers, as found by trying (not by version number)."""

    kernel: str
    pidfd: bool
    #: Exit statuses kept on pidfds (Linux >= 6.15), tried on a real child.
    pidfd_info_exit: bool
    #: Whether this process is a child subreaper; None when prctl could not say.
    child_subreaper: Optional[bool]
    proc_children: bool
    cgroup_kill: bool


class BackendInfo(TypedDict):
    """:func:`backend_info`: the active backend, why, and what the others lack here."""

    backend: str
    reason: str
    available: dict[str, bool]
    unavailable_because: dict[str, str]
    features: KernelFeatures


_lock = threading.Lock()
_active: Optional[Backend] = None
_reason = ""


def _pidfd_problem() -> Optional[str]:
    """Why pidfds cannot be used here, or None when they work."""
    if not hasattr(os, "pidfd_open"):
        return "this Python has no os.pidfd_open (needs 3.9+)"
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as exc:
        return f"pidfd_open failed: {exc.strerror} (needs Linux >= 5.3, not blocked by seccomp)"
    os.close(fd)
    return None


def load_native() -> Any:
    """The compiled C core, ``ralph_reaper._native`` (ImportError when it is not built).

    Imported by name at run time: it is a binary that may be missing, and an
    import statement naming it would make static tools see an import of the
    whole package from here.
    """
    return importlib.import_module("ralph_reaper._native")


def _native_problem() -> Optional[str]:
    try:
        load_native()
    except ImportError as exc:
        return f"the C extension ralph_reaper._native is not built ({exc})"
    return _pidfd_problem()


def problems() -> dict[str, Optional[str]]:
    """For each backend, None when it can run here, else the reason it cannot."""
    pidfd = _pidfd_problem()
    return {"native": _native_problem(), "pure": pidfd, "polling": None}


def available() -> list[str]:
    return [name for name, problem in problems().items() if problem is None]


def create(name: str) -> Backend:
    """A fresh backend by name, or BackendUnavailableError saying why not."""
    if name not in NAMES:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    problem = problems()[name]
    if problem is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {problem}")
    if name == "native":
        from .native import NativeBackend

        return NativeBackend()
    if name == "pure":
        from .pure import PureBackend

        return PureBackend()
    from .polling import PollingBackend

    return PollingBackend()


def _choose() -> tuple[Backend, str]:
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        return create(forced), f"forced by {ENV_VAR}={forced}"
    found = problems()
    for name in NAMES:
        if found[name] is None:
            skipped = "; ".join(f"{n}: {found[n]}" for n in NAMES[: NAMES.index(name)])
            return create(name), ("best available" + (f" ({skipped})" if skipped else ""))
    raise AssertionError("the polling backend is always available")


def get() -> Backend:
    """The active backend, chosen once per process."""
    global _active, _reason
    backend = _active
    if backend is not None:
        return backend
    with _lock:
        if _active is None:
            _active, _reason = _choose()
        return _active


@contextmanager
def using(name: str) -> Iterator[Backend]:
    """Run a block with another backend active (tests and benchmarks compare backends)."""
    global _active, _reason
    backend = create(name)
    with _lock:
        saved = (_active, _reason)
        _active, _reason = backend, f"selected by using({name!r})"
    try:
        yield backend
    finally:
        with _lock:
            _active, _reason = saved


def _kernel_features() -> KernelFeatures:
    from . import _prctl

    pid = os.getpid()
    pidfd = _pidfd_problem() is None
    subreaper: Optional[bool]
    try:
        subreaper = _prctl.get_child_subreaper()
    except OSError:
        subreaper = None
    return {
        "kernel": platform.release(),
        "pidfd": pidfd,
        "pidfd_info_exit": pidfd and _exit_info_works(),
        "child_subreaper": subreaper,
        "proc_children": os.path.exists(f"/proc/{pid}/task/{pid}/children"),
        "cgroup_kill": os.path.exists("/sys/fs/cgroup/cgroup.kill"),
    }


def _exit_info_works() -> bool:
    """Whether the kernel keeps exit statuses on pidfds (Linux >= 6.15), tried on a real child."""
    import subprocess

    from .pure import pidfd_exit_status

    proc = subprocess.Popen(["/bin/sh", "-c", "exit 7"])
    fd = os.pidfd_open(proc.pid)
    try:
        proc.wait()
        status = pidfd_exit_status(fd)
    finally:
        os.close(fd)
    return status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


def backend_info() -> BackendInfo:
    """Which backend is active and why, what each backend lacks here, and the kernel's features."""
    backend = get()
    return {
        "backend": backend.name,
        "reason": _reason,
        "available": {name: problem is None for name, problem in problems().items()},
        "unavailable_because": {n: p for n, p in problems().items() if p is not None},
        "features": _kernel_features(),
    }
