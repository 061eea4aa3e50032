# Developer checks of the C core (csrc/reaper.c); the Python package itself
# is built by setup.py / pip.
#
#   make sanitize     C test driver under AddressSanitizer + UBSan
#   make valgrind     the same driver under valgrind (no sanitizers)
#   make glibc-check  build the extension and check it needs glibc <= 2.17
#
# PYTHON is the interpreter whose pip builds the wheel for glibc-check.

PYTHON ?= python3
ifeq ($(origin CC),default)
CC := gcc
endif
WARN := -std=gnu99 -Wall -Wextra -Werror
SAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -g -O1
SRCS := csrc/reaper.c csrc/test_reaper.c
BUILD := build/csrc
GLIBC_MAX := 2.17

.PHONY: sanitize valgrind glibc-check clean-csrc

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

sanitize: $(BUILD)/test_reaper_san $(BUILD)/test_reaper_san_scan
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 $(BUILD)/test_reaper_san
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 $(BUILD)/test_reaper_san_scan

VALGRIND := valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect --track-fds=no

valgrind: $(BUILD)/test_reaper_vg $(BUILD)/test_reaper_vg_scan
	$(VALGRIND) $(BUILD)/test_reaper_vg
	$(VALGRIND) $(BUILD)/test_reaper_vg_scan

# Builds the wheel exactly as pip would (isolated build env, so it works from
# any interpreter with pip) with the native build made mandatory, then reads
# the GLIBC_x.y symbol versions the extension references.
glibc-check:
	rm -rf build/glibc-check
	RALPH_REAPER_REQUIRE_NATIVE=1 $(PYTHON) -m pip wheel -q --no-deps -w build/glibc-check/wheel .
	$(PYTHON) -m zipfile -e build/glibc-check/wheel/*.whl build/glibc-check/unpacked
	@so=$$(ls build/glibc-check/unpacked/ralph_reaper/_native*.so) || exit 1; \
	vers=$$(objdump -T $$so | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -u -V); \
	echo "glibc versions referenced by $$so: $$(echo $$vers)"; \
	max=$$(printf '%s\n' $$vers | sort -V | tail -n 1); \
	echo "max GLIBC version: $$max (limit $(GLIBC_MAX))"; \
	nm -D --undefined-only $$so | grep '@GLIBC_' | sort -t@ -k2 -V | sed 's/^/    /'; \
	if [ -z "$$max" ]; then echo "FAIL: no GLIBC versions found in $$so"; exit 1; fi; \
	if [ "$$(printf '%s\n%s\n' "$$max" "$(GLIBC_MAX)" | sort -V | tail -n 1)" != "$(GLIBC_MAX)" ]; then \
		echo "FAIL: $$so needs GLIBC_$$max > GLIBC_$(GLIBC_MAX)"; exit 1; \
	fi; \
	echo "OK: no symbol newer than GLIBC_$(GLIBC_MAX)"

clean-csrc:
	rm -rf $(BUILD) build/glibc-check
