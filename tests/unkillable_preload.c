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
 * CPython's signal.pidfd_send_signal all use syscall(3) for it).  A SIGKILL
 * to a whole process group (killpg, kill with a negative pid, or a pidfd
 * with PIDFD_SIGNAL_PROCESS_GROUP) is sent to each member in turn instead,
 * sparing the targets, as the kernel's group signal would miss a process in
 * D state.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
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

#define PIDFD_SIGNAL_PROCESS_GROUP (1UL << 2)

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

static int real_kill(pid_t pid, int sig)
{
    static int (*next)(pid_t, int);

    if (!next)
        next = (int (*)(pid_t, int))dlsym(RTLD_NEXT, "kill");
    return next(pid, sig);
}

/* The process group of pid (field 5 of its stat), or 0. */
static pid_t pgrp_of(pid_t pid)
{
    char path[64], stat[512], *end;
    int pgrp = 0;

    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    if (read_small(path, stat, sizeof stat) <= 0 || !(end = strrchr(stat, ')')))
        return 0;
    if (sscanf(end + 1, " %*c %*d %d", &pgrp) != 1)
        return 0;
    return (pid_t)pgrp;
}

/* SIGKILL every member of group pgid but the targets; 0 if one was found. */
static int kill_group_sparing(pid_t pgid)
{
    DIR *proc = opendir("/proc");
    struct dirent *d;
    int found = 0;

    if (!proc)
        return -1;
    while ((d = readdir(proc)) != NULL) {
        pid_t pid = (pid_t)strtol(d->d_name, NULL, 10);

        if (pid > 0 && pgrp_of(pid) == pgid) {
            found = 1;
            if (!is_target(pid))
                real_kill(pid, SIGKILL);
        }
    }
    closedir(proc);
    if (!found)
        errno = ESRCH;
    return found ? 0 : -1;
}

int kill(pid_t pid, int sig)
{
    if (sig == SIGKILL && pid < -1)
        return kill_group_sparing(-pid);
    if (sig == SIGKILL && is_target(pid))
        return 0;
    return real_kill(pid, sig);
}

int killpg(pid_t pgrp, int sig)
{
    static int (*next)(pid_t, int);

    if (sig == SIGKILL && pgrp > 1)
        return kill_group_sparing(pgrp);
    if (!next)
        next = (int (*)(pid_t, int))dlsym(RTLD_NEXT, "killpg");
    return next(pgrp, sig);
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
    if (number == SYS_pidfd_send_signal && a[1] == SIGKILL &&
        ((unsigned long)a[3] & PIDFD_SIGNAL_PROCESS_GROUP))
        return kill_group_sparing(pidfd_pid(a[0]));
    if (number == SYS_pidfd_send_signal && a[1] == SIGKILL && is_target(pidfd_pid(a[0])))
        return 0;
    if (!real_syscall)
        real_syscall = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real_syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
