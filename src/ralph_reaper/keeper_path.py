"""Where the keeper executable (``csrc/keeper.c``) was installed, if it was.

The keeper is a separate program, not a module: the host starts it with
``subprocess``, and it outlives nothing but the dispatch it supervises. The
build (setup.py) puts it next to the ``_native`` extension, inside this
package directory, in wheels, plain installs and editable installs alike. It
is optional in the same way the extension is: a machine without a C compiler
gets a working package without it, so callers must ask whether it is there and
fall back to another containment mode when it is not.
"""

from __future__ import annotations

import os
from typing import Literal, Optional

#: File name of the keeper executable inside the package directory.
KEEPER_NAME = "ralph-reaper-keeper"


def keeper_path() -> Optional[str]:
    """Absolute path of the shipped keeper executable, or None when it is unusable.

    None when the file is missing (the native build failed or was skipped) or
    not executable by this process (``os.access(X_OK)``; e.g. a wheel unpacked
    by a tool that dropped the run bit), so that a caller never tries to
    start a keeper that cannot run and can pick a fallback up front instead.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), KEEPER_NAME)
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return None


#: ELF program header type of the dynamic loader's path.
_PT_INTERP = 3


def keeper_linkage(path: str) -> Optional[str]:
    """``"static"`` or ``"dynamic"``: how the keeper at ``path`` was linked (None: not
    a 64-bit ELF file this can read).

    A static keeper starts without the dynamic loader, which is most of its start
    on the way to the command's, and the reason a build links it so; it also
    ignores ``LD_PRELOAD``, which a diagnosis (or a test's shim) may rely on.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
                return None
            order: Literal["little", "big"] = "little" if head[5] == 1 else "big"
            phoff = int.from_bytes(head[32:40], order)
            size, count = int.from_bytes(head[54:56], order), int.from_bytes(head[56:58], order)
            f.seek(phoff)
            table = f.read(size * count)
    except OSError:
        return None
    for i in range(count):
        if int.from_bytes(table[i * size : i * size + 4], order) == _PT_INTERP:
            return "dynamic"
    return "static"
