"""``ralph-reaper doctor``: what this machine offers, and what the package will do with it.

Features are the kernel's, not this process's: a doctor that reported its
own subreaper flag, or looked for ``cgroup.kill`` in the root cgroup (where
the kernel never puts one), would describe itself rather than the host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from typing import Any, Optional

from . import __version__
from .backends import backend_info
from .backends import get as get_backend
from .cli_report import SCHEMA, emit
from .keeper_path import keeper_linkage, keeper_path


def add_parser(sub: Any) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="the backend, the kernel's features, the containment and cgroup v2 state",
    )
    doctor.add_argument("--json", action="store_true", help="all of it as one JSON object")
    doctor.set_defaults(func=cmd_doctor, parser=doctor)


def _subreaper_supported() -> bool:
    """Whether the kernel has PR_SET_CHILD_SUBREAPER (tried on this short-lived process)."""
    from .backends import _prctl

    try:
        before = _prctl.get_child_subreaper()
        _prctl.set_child_subreaper(True)
        _prctl.set_child_subreaper(before)
    except OSError:
        return False
    return True


def _cgroup2_mount() -> Optional[str]:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        return None
    return None


def _own_cgroup() -> Optional[str]:
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_state() -> dict[str, Any]:
    """The cgroup v2 mount, this process's cgroup, and whether it could be given sub-cgroups."""
    mount = _cgroup2_mount()
    own = _own_cgroup()
    state: dict[str, Any] = {"v2_mount": mount, "own": own, "path": None}
    if mount is None or own is None:
        state.update(writable=False, delegated=False, controllers=None, kill_file=False)
        return state
    path = os.path.normpath(os.path.join(mount, own.lstrip("/")))
    state["path"] = path
    st = None
    with contextlib.suppress(OSError):
        st = os.stat(path)
    state["writable"] = os.access(path, os.W_OK) and os.access(
        os.path.join(path, "cgroup.procs"), os.W_OK
    )
    # Delegated: handed to this user (owned by it), not merely writable because we are root.
    state["delegated"] = st is not None and st.st_uid == os.geteuid() and os.geteuid() != 0
    controllers = _read(os.path.join(path, "cgroup.controllers"))
    state["controllers"] = None if controllers is None else controllers.split()
    state["kill_file"] = os.path.exists(os.path.join(path, "cgroup.kill"))
    state["root"] = own == "/"
    return state


def _cgroup_kill_supported(mount: Optional[str], cgroup: dict[str, Any]) -> Optional[bool]:
    """``cgroup.kill`` exists in every non-root cgroup of a kernel that has it (>= 5.14)."""
    if cgroup.get("kill_file"):
        return True
    if mount is None:
        return None
    try:
        with os.scandir(mount) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    return os.path.exists(os.path.join(entry.path, "cgroup.kill"))
    except OSError:
        return None
    return _kernel_at_least(5, 14)  # a root cgroup with no child to look in: by version


def _kernel_at_least(major: int, minor: int) -> Optional[bool]:
    parts = platform.release().split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (IndexError, ValueError):
        return None


def containment() -> dict[str, str]:
    """What ``spawn_dispatch`` (and ``run``) would contain a dispatch with here, and why."""
    backend = get_backend()
    if backend.name != "native":
        return {
            "mode": "session",
            "why": f"the {backend.name} backend has no keeper (it needs the native build)",
        }
    try:
        path = keeper_path()
    except Exception as exc:  # the keeper is missing: the native build is incomplete
        return {"mode": "session", "why": f"no keeper executable: {exc}"}
    if path is None or not os.access(path, os.X_OK):
        return {"mode": "session", "why": "no keeper executable in the package"}
    linkage = keeper_linkage(path) or "linkage unknown"
    return {
        "mode": "keeper",
        "why": f"native backend with its keeper ({os.path.basename(path)}, {linkage})",
    }


def doctor_info() -> dict[str, Any]:
    info: dict[str, Any] = dict(backend_info())
    cgroup = cgroup_state()
    features = dict(info["features"])
    features["kernel"] = platform.release()
    features["child_subreaper"] = _subreaper_supported()
    features["cgroup_kill"] = _cgroup_kill_supported(cgroup["v2_mount"], cgroup)
    features["cgroup2"] = cgroup["v2_mount"] is not None
    info.update(
        schema=SCHEMA,
        version=__version__,
        features=features,
        containment=containment(),
        cgroup=cgroup,
    )
    return info


def cmd_doctor(args: argparse.Namespace) -> int:
    info = doctor_info()
    if args.json:
        emit(json.dumps(info, indent=2, sort_keys=True))
        return 0
    lines = [f"ralph-reaper {__version__}", f"backend: {info['backend']} ({info['reason']})"]
    for name, ok in info["available"].items():
        why = info["unavailable_because"].get(name, "")
        lines.append(f"  {name:8} {'available' if ok else 'unavailable: ' + why}")
    lines.append("kernel features:")
    for key, value in info["features"].items():
        lines.append(f"  {key:18} {value}")
    cont = info["containment"]
    lines.append(f"containment: {cont['mode']} ({cont['why']})")
    cg = info["cgroup"]
    lines.append("cgroup v2:")
    lines.append(f"  mount              {cg['v2_mount']}")
    lines.append(f"  own cgroup         {cg['own']}")
    lines.append(f"  writable           {cg['writable']}")
    lines.append(f"  delegated          {cg['delegated']}")
    lines.append(f"  controllers        {' '.join(cg['controllers'] or []) or '-'}")
    for line in lines:
        if not emit(line):
            break  # the reader went away (| head): not an error of ours
    return 0
