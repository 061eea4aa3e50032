/*
 * LD_PRELOAD shim for tests/test_unkillable.py: SIGKILL misses every process
 * whose command name (comm) is "rr-unkillable".
 *
 * A process that survives SIGKILL is one stuck in uninterruptible sleep
 * (a hung NFS or FUSE request, a wedged device driver).  That cannot be
 * produced on demand, so this shim stands in for it: loaded into the process
 * that runs a stop sequence (the host, or the keeper), it turns that
 * process's SIGKILL to such a target into a no-op that reports success, just
 * as the kernel reports success when it queues SIGKILL for a process in D
 * state that will not act on it.  Everything else passes through unchanged.
 *
 * It wraps the two ways our code sends a signal: kill(2) through libc, and
 * pidfd_send_signal(2) through syscall(3) (the C core, the keeper and
 * CPython's signal.pidfd_send_signal all use syscall(3) for it).  Signals to
 * a process group (kill with pid <= 0) pass through: nothing in the stop
 * sequences sends those.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

static const char TARGET[] = "rr-unkillable\n";

/* Read up to cap-1 bytes of a small /proc file; -1 if it cannot be read. */
static ssize_t read_small(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return -1;
    n = read(fd, buf, cap - 1);
    close(fd);
    if (n >= 0)
        buf[n] = '\0';
    return n;
}

static int is_target(pid_t pid)
{
    char path[64], comm[64];

    if (pid <= 0)
        return 0;
    snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
    return read_small(path, comm, sizeof comm) > 0 && strcmp(comm, TARGET) == 0;
}

/* The pid a pidfd refers to, from its fdinfo ("Pid:\t<pid>"); 0 if unknown. */
static pid_t pidfd_pid(long fd)
{
    char path[64], info[512], *line;

    snprintf(path, sizeof path, "/proc/self/fdinfo/%ld", fd);
    if (read_small(path, info, sizeof info) <= 0)
        return 0;
    line = strstr(info, "\nPid:");
    return line ? (pid_t)strtol(line + 5, NULL, 10) : 0;
}

int kill(pid_t pid, int sig)
{
    static int (*real_kill)(pid_t, int);

    if (sig == SIGKILL && is_target(pid))
        return 0;
    if (!real_kill)
        real_kill = (int (*)(pid_t, int))dlsym(RTLD_NEXT, "kill");
    return real_kill(pid, sig);
}

long syscall(long number, ...)
{
    static long (*real_syscall)(long, ...);
    long a[6];
    va_list ap;
    int i;

    va_start(ap, number);
    for (i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    if (number == SYS_pidfd_send_signal && a[1] == SIGKILL && is_target(pidfd_pid(a[0])))
        return 0;
    if (!real_syscall)
        real_syscall = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real_syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
