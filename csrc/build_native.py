"""cffi builder for ``ralph_reaper._native`` (the C core in csrc/reaper.c).

Used by setup.py through ``cffi_modules=["csrc/build_native.py:ffibuilder"]``;
run directly (``python csrc/build_native.py``) it only writes the generated C
wrapper to build/_native.c. The cdef is csrc/reaper.h itself, so the
declarations cannot drift.
"""

from __future__ import annotations

import os

import cffi

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
    extra_compile_args=["-std=gnu99", "-Wall", "-Wextra", "-Werror"],
    py_limited_api=True,
)

if __name__ == "__main__":
    _out = os.path.join(_HERE, os.pardir, "build")
    os.makedirs(_out, exist_ok=True)
    ffibuilder.emit_c_code(os.path.join(_out, "_native.c"))
