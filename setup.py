"""Build glue for the optional C core; all metadata lives in pyproject.toml.

A failed native build degrades to the pure-Python backends with a warning,
unless CIBUILDWHEEL=1 or RALPH_REAPER_REQUIRE_NATIVE=1 (release wheels must
never silently ship without it).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

_BUILD_ERRORS = (CCompilerError, CompileError, ExecError, PlatformError, OSError)


def _native_required() -> bool:
    return any(os.environ.get(v) == "1" for v in ("CIBUILDWHEEL", "RALPH_REAPER_REQUIRE_NATIVE"))


def _warn(exc: BaseException) -> None:
    bar = "*" * 78
    sys.stderr.write(
        f"\n{bar}\nralph-reaper: the native backend failed to build ({exc}); "
        f"installing the pure-Python backend only\n{bar}\n\n"
    )


class OptionalBuildExt(build_ext):
    """build_ext that warns and carries on without an extension it cannot build."""

    def run(self) -> None:
        try:
            super().run()
        except _BUILD_ERRORS as exc:  # e.g. no usable compiler at all
            if _native_required():
                raise
            _warn(exc)
            self.extensions = []

    def build_extensions(self) -> None:
        self.check_extensions_list(self.extensions)
        built = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
            except _BUILD_ERRORS as exc:
                if _native_required():
                    raise
                _warn(exc)
            else:
                built.append(ext)
        # Later steps (--inplace copy, wheel/editable outputs) only see what exists.
        self.extensions = built


setup(
    cffi_modules=["csrc/build_native.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
