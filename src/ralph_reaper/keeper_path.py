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
from typing import Optional

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
