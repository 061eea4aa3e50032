"""Build glue for the optional C core; all metadata lives in pyproject.toml.

build_ext also builds the keeper (csrc/keeper.c + csrc/reaper.c), a small
executable named ralph-reaper-keeper placed next to the _native extension
(so it ships inside the package, in wheels and with --inplace / pip install -e).

A failed native build (extension or keeper) degrades to the pure-Python
backends with a warning, unless CIBUILDWHEEL=1 or RALPH_REAPER_REQUIRE_NATIVE=1
(release wheels must never silently ship without it).

The keeper is linked statically where the C library allows it (a static
keeper starts without the dynamic loader, which is most of the time from its
exec to the command's: spawn_dispatch waits for that), and dynamically where
it does not (zig's glibc targets) or under a sanitizer (its runtime is a
shared library). RALPH_REAPER_KEEPER_CC names another compiler for the keeper
alone, always static: the release wheel's is zig targeting musl (Makefile).

The C flags come from csrc/build_native.py (-Werror only in development and
CI builds, see there). Both binaries are linked without a RUNPATH (they need
nothing but libc; the build Python's own rpath, e.g. a pyenv's lib directory,
would otherwise land in them) and stripped (-s), unless build_ext --debug or
RALPH_REAPER_STRIP=0 (make sanitize-python keeps the symbols for its reports).
"""

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Optional

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

_BUILD_ERRORS = (CCompilerError, CompileError, ExecError, PlatformError, OSError)

_NATIVE = "ralph_reaper._native"
KEEPER = "ralph-reaper-keeper"
_KEEPER_SOURCES = [os.path.join("csrc", "keeper.c"), os.path.join("csrc", "reaper.c")]

#: A compiler command for the keeper alone (e.g. "zig cc -target x86_64-linux-musl").
_KEEPER_CC = "RALPH_REAPER_KEEPER_CC"

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from build_native import c_flags  # noqa: E402

_C_FLAGS = c_flags()


def _native_required() -> bool:
    return any(os.environ.get(v) == "1" for v in ("CIBUILDWHEEL", "RALPH_REAPER_REQUIRE_NATIVE"))


def _without_rpath(args: Sequence[str]) -> list[str]:
    """A linker command line without its run-time search path options."""
    out: list[str] = []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in ("-R", "-rpath", "--rpath"):
            skip_next = True
        elif not arg.startswith(("-Wl,-rpath", "-Wl,--rpath", "-Wl,-R")):
            out.append(arg)
    return out


def _warn(
    exc: BaseException,
    what: str = "the native backend",
    outcome: str = "installing the pure-Python backend only",
) -> None:
    bar = "*" * 78
    sys.stderr.write(f"\n{bar}\nralph-reaper: {what} failed to build ({exc}); {outcome}\n{bar}\n\n")


class OptionalBuildExt(build_ext):
    """build_ext that also builds the keeper, and warns and carries on without
    an extension (or the keeper) it cannot build."""

    def run(self) -> None:
        try:
            super().run()
        except _BUILD_ERRORS as exc:  # e.g. no usable compiler at all
            if _native_required():
                raise
            _warn(exc)
            self.extensions = []

    def _strip(self) -> bool:
        return not self.debug and os.environ.get("RALPH_REAPER_STRIP") != "0"

    def _link_flags(self) -> list[str]:
        return ["-s"] if self._strip() else []

    def build_extensions(self) -> None:
        # The compiler is configured (from sysconfig and CC/LDSHARED/LDFLAGS)
        # by now: take the rpath out of both link commands.
        for attr in ("linker_so", "linker_so_cxx", "linker_exe"):
            cmd = getattr(self.compiler, attr, None)
            if isinstance(cmd, list):
                setattr(self.compiler, attr, _without_rpath(cmd))
        for ext in self.extensions:
            ext.extra_link_args = list(ext.extra_link_args or []) + self._link_flags()
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
        self._build_keeper()

    # -- the keeper executable ---------------------------------------------

    def _keeper_file(self, inplace: bool) -> str:
        """Where the keeper goes: beside _native, in build_lib or (inplace) the source tree."""
        saved, self.inplace = self.inplace, inplace
        try:
            return os.path.join(os.path.dirname(self.get_ext_fullpath(_NATIVE)), KEEPER)
        finally:
            self.inplace = saved

    def _build_keeper(self) -> None:
        # setuptools' run() builds with inplace off, then copies to the source
        # tree (copy_extensions_to_source) when --inplace / editable.
        self._keeper_built: Optional[str] = None
        target = self._keeper_file(bool(self.inplace))
        try:
            self.mkpath(os.path.dirname(target))
            own_cc = os.environ.get(_KEEPER_CC)
            if own_cc:
                self._keeper_with(shlex.split(own_cc), target)
            else:
                self._keeper_with_compiler(target)
            os.chmod(target, 0o755)
        except _BUILD_ERRORS as exc:
            if _native_required():
                raise
            _warn(exc, "the keeper executable", "installing without it (keeper_path() is None)")
        else:
            self._keeper_built = target

    def _keeper_with_compiler(self, target: str) -> None:
        objects = self.compiler.compile(
            _KEEPER_SOURCES,
            output_dir=os.path.join(self.build_temp, "keeper"),
            include_dirs=["csrc"],
            debug=self.debug,
            extra_postargs=_C_FLAGS,
        )
        link = _C_FLAGS + self._link_flags()
        for static in ([["-static"]] if self._static_keeper() else []) + [[]]:
            try:
                self.compiler.link_executable(
                    objects,
                    os.path.basename(target),
                    output_dir=os.path.dirname(target),
                    debug=self.debug,
                    extra_postargs=link + static,
                )
                return
            except _BUILD_ERRORS:
                if not static:
                    raise
                self.announce("the keeper cannot be linked statically here: linking it dynamically")

    def _static_keeper(self) -> bool:
        """False under a sanitizer, whose runtime is a shared library."""
        cmd = getattr(self.compiler, "linker_exe", None) or []
        words = [os.environ.get(v, "") for v in ("CC", "CFLAGS", "LDFLAGS")] + list(cmd)
        return not any("-fsanitize" in w for w in words)

    def _keeper_with(self, cc: list[str], target: str) -> None:
        """Compile and link the keeper with ``cc`` in one command, statically."""
        cmd = [*cc, *_C_FLAGS, "-O2", "-static", "-Icsrc", *self._link_flags(), "-o", target]
        self.announce(" ".join(cmd + _KEEPER_SOURCES), level=2)
        try:
            subprocess.run(cmd + _KEEPER_SOURCES, check=True)
        except subprocess.CalledProcessError as exc:
            raise CompileError(f"{_KEEPER_CC}: {exc}") from exc

    def _keeper_exists(self) -> bool:
        """True once this run built the keeper into the build directory."""
        built = getattr(self, "_keeper_built", None)
        return built is not None and built == self._keeper_file(False) and os.path.exists(built)

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        if self._keeper_exists():
            inplace = self._keeper_file(True)
            self.copy_file(self._keeper_file(False), inplace, level=self.verbose)
            os.chmod(inplace, 0o755)

    def get_outputs(self) -> list[str]:
        outputs = list(super().get_outputs())
        keeper = self._keeper_file(False)
        if self._keeper_exists() and keeper not in outputs:
            outputs.append(keeper)
        return outputs

    def get_output_mapping(self) -> dict[str, str]:
        """setuptools >= 64 (editable installs): build file -> source-tree file."""
        base = getattr(super(), "get_output_mapping", None)
        mapping = dict(base()) if base is not None else {}
        if self.inplace and self._keeper_exists():
            mapping[self._keeper_file(False)] = self._keeper_file(True)
        return mapping


setup(
    cffi_modules=["csrc/build_native.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
