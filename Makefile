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
#                     keeper need glibc <= 2.17
#
# PYTHON is the interpreter whose pip builds the wheel for glibc-check, and
# that runs the keeper driver (standard library only); for sanitize-python it
# needs setuptools, cffi and the test extras (e.g. a venv's python).

PYTHON ?= python3
ifeq ($(origin CC),default)
CC := gcc
endif
WARN := -std=gnu99 -Wall -Wextra -Werror
SAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -g -O1
SRCS := csrc/reaper.c csrc/test_reaper.c
KEEPER_SRCS := csrc/keeper.c csrc/reaper.c
BUILD := build/csrc
GLIBC_MAX := 2.17

.PHONY: sanitize sanitize-python valgrind glibc-check clean-csrc

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
# build's own -Wall -Wextra -Werror stay; -fno-wrapv undoes CPython's -fwrapv,
# under which UBSan does not check signed overflow) and the sanitizers in CC
# so that the keeper links with them too.  Every Python of the run, the tests'
# child Pythons included, gets libasan and libubsan preloaded (CPython is not
# built with them, and ASan's runtime has to come first) and that build first
# on sys.path: a sitecustomize there moves it ahead of src/, which some tests
# prepend.  RALPH_REAPER_BACKEND=native runs the backend-parametrized tests
# on the native backend only; PY_SAN_TESTS=... picks other test files.
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
# backend is forced).
PY_SAN := build/asan
PY_SAN_TESTS ?= tests/test_native_core.py tests/test_behaviour.py tests/test_monitor.py \
	tests/test_faults.py tests/test_tracking.py tests/test_tree_shapes.py tests/test_spawn.py \
	tests/test_keeper_exec.py tests/test_pid_reuse.py tests/test_aio.py tests/test_cli.py \
	tests/test_bad_input.py tests/test_defects.py tests/test_compat.py tests/test_unkillable.py
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
	RALPH_REAPER_REQUIRE_NATIVE=1 CC="$(CC) -fsanitize=address,undefined" CFLAGS="$(SAN) -fno-wrapv" \
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
	@{ $(PY_SAN_ENV) $(PYTHON) -m pytest -p no:cacheprovider -q --capture=sys $(PY_SAN_TESTS) 2>&1; \
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

clean-csrc:
	rm -rf $(BUILD) build/glibc-check $(PY_SAN)
