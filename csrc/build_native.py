"""cffi builder for ``ralph_reaper._native`` (the C core in csrc/reaper.c), and
the one place that says which C flags the project's C code is built with.

Used by setup.py through ``cffi_modules=["csrc/build_native.py:ffibuilder"]``;
setup.py and the Makefile take their flags from here too (``c_flags()``, or
``python3 csrc/build_native.py --cflags`` for the Makefile, which needs no
cffi). Run with no argument it only writes the generated C wrapper to
build/_native.c. The cdef is csrc/reaper.h itself, so the declarations cannot
drift.

Warnings are errors (-Werror) only in development and CI builds, never by
default: a user whose newer compiler warns about something new must still get
the native backend. A build is a development/CI build when
RALPH_REAPER_REQUIRE_NATIVE=1 (it must not fall back to pure Python either);
RALPH_REAPER_WERROR=1 or =0 says so explicitly and wins over that.
"""

from __future__ import annotations

import os
import sys

#: Flags for every compile and link of csrc/*.c (extension, keeper, drivers).
C_FLAGS = ["-std=gnu99", "-Wall", "-Wextra"]
WERROR = "-Werror"


def werror_wanted() -> bool:
    """True for a development/CI build (see the module docstring)."""
    explicit = os.environ.get("RALPH_REAPER_WERROR")
    if explicit in ("0", "1"):
        return explicit == "1"
    return os.environ.get("RALPH_REAPER_REQUIRE_NATIVE") == "1"


def c_flags(werror: bool | None = None) -> list[str]:
    """C_FLAGS, plus -Werror when ``werror`` (default: ``werror_wanted()``)."""
    if werror is None:
        werror = werror_wanted()
    return C_FLAGS + ([WERROR] if werror else [])


if __name__ == "__main__" and sys.argv[1:2] == ["--cflags"]:
    # For the Makefile: "--cflags" alone follows the environment like setup.py;
    # "--cflags --werror" always adds -Werror (the developer checks).
    print(" ".join(c_flags(True if sys.argv[2:] == ["--werror"] else None)))
    sys.exit(0)

import cffi  # noqa: E402  (not needed by --cflags, which runs before any venv)

_HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(path: str) -> str:
    # setuptools insists on source paths relative to the setup.py directory
    # (the current directory when it imports us).
    return os.path.relpath(os.path.join(_HERE, path))


with open(os.path.join(_HERE, "reaper.h"), encoding="utf-8") as _header:
    _CDEF = _header.read()

ffibuilder = cffi.FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source(
    "ralph_reaper._native",
    '#include "reaper.h"',
    sources=[_rel("reaper.c")],
    include_dirs=[_rel(".")],
    extra_compile_args=c_flags(),
    py_limited_api=True,
)

if __name__ == "__main__":
    _out = os.path.join(_HERE, os.pardir, "build")
    os.makedirs(_out, exist_ok=True)
    ffibuilder.emit_c_code(os.path.join(_out, "_native.c"))
