/*
 * ralph-reaper C core.  See reaper.h for the API and its conventions:
 * every function returns >= 0 on success and -errno on failure, never
 * aborts, never prints, and never hands the caller memory to free.
 *
 * Portability: the wheels are built against manylinux2014 (glibc 2.17), so
 * anything newer than that (pidfd_open, pidfd_send_signal, waitid with
 * P_PIDFD and rusage, the PIDFD_GET_INFO ioctl) goes through syscall(2) and
 * the constants are defined here when the build host's headers lack them.
 * Library calls are restricted to ones glibc 2.17 exports (no stat(),
 * fcntl64(), getdents64(), strtol() family redirects).
 *
 * Blocking waits (poll, epoll_wait, blocking waitid) deliberately return
 * -EINTR instead of retrying: the Python caller must get control back so that
 * its signal handlers (SIGINT, SIGTERM) run, and it then retries with the
 * remaining time, as PEP 475 prescribes for the standard library.  Calls that
 * cannot block for long (waitid with WNOHANG, read of /proc, ioctl) are
 * retried here.
 */

#define _GNU_SOURCE

#ifdef __GNUC__
/* Our own code must stay clean under -Wall -Wextra whatever flags the
   embedding build uses (the cffi wrapper is compiled with the interpreter's
   flags). */
#pragma GCC diagnostic error "-Wall"
#pragma GCC diagnostic error "-Wextra"
#endif

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "reaper.h"

/* ---- constants glibc 2.17 / old kernel headers may lack ----------------- */

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_epoll_pwait2
#define SYS_epoll_pwait2 441 /* one number on every architecture (Linux 5.11) */
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif
#ifndef __WALL
#define __WALL 0x40000000
#endif
#ifndef PR_SET_CHILD_SUBREAPER
#define PR_SET_CHILD_SUBREAPER 36
#endif
#ifndef PR_GET_CHILD_SUBREAPER
#define PR_GET_CHILD_SUBREAPER 37
#endif
#ifndef EPOLL_CLOEXEC
#define EPOLL_CLOEXEC O_CLOEXEC
#endif

/*
 * struct pidfd_info, first published version (PIDFD_INFO_SIZE_VER0 = 64
 * bytes, Linux 6.13; exit_code filled since 6.15 when PIDFD_INFO_EXIT is
 * requested).  Our own copy so that old headers do not matter.  The kernel
 * accepts any size >= VER0 and fills what both sides know.
 *
 * Verified on Linux 6.18: exit_code holds the wait status in waitpid(2)
 * encoding (exit(3) -> 0x300, SIGKILL -> 9), and PIDFD_INFO_EXIT only comes
 * back once the process has been reaped (a zombie reports no exit info).
 */
struct rr_pidfd_info {
    uint64_t mask;
    uint64_t cgroupid;
    uint32_t pid;
    uint32_t tgid;
    uint32_t ppid;
    uint32_t ruid;
    uint32_t rgid;
    uint32_t euid;
    uint32_t egid;
    uint32_t suid;
    uint32_t sgid;
    uint32_t fsuid;
    uint32_t fsgid;
    int32_t exit_code;
};

typedef char rr_assert_pidfd_info_size[sizeof(struct rr_pidfd_info) == 64 ? 1 : -1];
typedef char rr_assert_pidfd_info_exit[offsetof(struct rr_pidfd_info, exit_code) == 60 ? 1 : -1];

#define RR_PIDFD_GET_INFO _IOWR(0xFF, 11, struct rr_pidfd_info)
#define RR_PIDFD_INFO_EXIT (1ULL << 3)

/* Upper bound on processes handled by the /proc walks (PID_MAX_LIMIT). */
#define RR_MAX_PROCS (4 * 1024 * 1024)

/* Stack chunk of epoll events fetched per epoll_wait call. */
#define RR_EPOLL_CHUNK 256

/* The epoll data word packs the pidfd (low 32 bits) and the token (high). */
#define RR_TOKEN_MAX 0xFFFFFFFFULL

/* ---- small helpers ------------------------------------------------------- */

static int neg_errno(void)
{
    return errno > 0 ? -errno : -EIO;
}

static int status_from_siginfo(const siginfo_t *si)
{
    int st = si->si_status;

    switch (si->si_code) {
    case CLD_EXITED:
        return (st & 0xff) << 8;
    case CLD_KILLED:
        return st & 0x7f;
    case CLD_DUMPED:
        return (st & 0x7f) | 0x80;
    case CLD_STOPPED:
    case CLD_TRAPPED:
        return ((st & 0xff) << 8) | 0x7f;
    case CLD_CONTINUED:
        return 0xffff;
    default:
        return 0;
    }
}

static void fill_rusage(struct rr_rusage *out, const struct rusage *ru)
{
    out->utime_s = (double)ru->ru_utime.tv_sec + (double)ru->ru_utime.tv_usec / 1e6;
    out->stime_s = (double)ru->ru_stime.tv_sec + (double)ru->ru_stime.tv_usec / 1e6;
    out->maxrss_kb = ru->ru_maxrss;
}

/* waitid(P_PIDFD) with rusage: 1 reaped, 0 nothing yet (WNOHANG), -errno. */
static int waitid_pidfd_raw(int pidfd, int options, int *status, struct rr_rusage *rusage)
{
    siginfo_t si;
    struct rusage ru;
    long r;

    if (pidfd < 0)
        return -EBADF;
    for (;;) {
        memset(&si, 0, sizeof si);
        memset(&ru, 0, sizeof ru);
        r = syscall(SYS_waitid, P_PIDFD, pidfd, &si, options, &ru);
        if (r == 0)
            break;
        if (errno == EINTR && (options & WNOHANG))
            continue;
        return neg_errno();
    }
    if (si.si_pid == 0)
        return 0;
    if (status)
        *status = status_from_siginfo(&si);
    if (rusage)
        fill_rusage(rusage, &ru);
    return 1;
}

/* Write the decimal form of v (>= 0) at p; returns the number of chars. */
static size_t put_uint(char *p, unsigned long v)
{
    char tmp[24];
    size_t n = 0, i;

    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < sizeof tmp);
    for (i = 0; i < n; i++)
        p[i] = tmp[n - 1 - i];
    return n;
}

/* Build "<a>/<tail>" (a >= 0) into buf of size cap; a must fit. */
static void path_num(char *buf, size_t cap, const char *head, unsigned long a, const char *tail)
{
    size_t n = 0, hl = strlen(head), tl = strlen(tail);

    if (hl + 24 + tl + 1 > cap) {
        buf[0] = '\0';
        return;
    }
    memcpy(buf, head, hl);
    n = hl;
    n += put_uint(buf + n, a);
    memcpy(buf + n, tail, tl);
    buf[n + tl] = '\0';
}

/* Parse a decimal directory name; -1 if it is not a positive number. */
static int parse_pid_name(const char *s)
{
    long v = 0;

    if (*s == '\0')
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (*s - '0');
        if (v > INT_MAX)
            return -1;
    }
    return v > 0 ? (int)v : -1;
}

/* Read at most cap - 1 bytes of path (relative to dirfd) into buf. */
static ssize_t read_small_file(int dirfd, const char *path, char *buf, size_t cap)
{
    size_t len = 0;
    int fd, saved;

    do {
        fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return neg_errno();
    while (len < cap - 1) {
        ssize_t n = read(fd, buf + len, cap - 1 - len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            saved = neg_errno();
            close(fd);
            return saved;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    return (ssize_t)len;
}

static int parse_ll(const char *p, const char *end, long long *out)
{
    int neg = 0;
    unsigned long long v = 0;

    if (p < end && (*p == '-' || *p == '+')) {
        neg = *p == '-';
        p++;
    }
    if (p >= end)
        return -1;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        if (v > (ULLONG_MAX - 9) / 10)
            return -1;
        v = v * 10 + (unsigned long long)(*p - '0');
    }
    *out = neg ? -(long long)v : (long long)v;
    return 0;
}

/* Parse the text of /proc/<pid>/stat.  The comm field (2) is in parentheses
   and may itself contain spaces and ')', so fields resume after the LAST ')'. */
static int parse_stat(const char *buf, size_t len, struct rr_proc_stat *out)
{
    const char *end = buf + len, *p = NULL, *q;
    int field = 3;
    long long v;

    for (q = end; q > buf;) {
        --q;
        if (*q == ')') {
            p = q + 1;
            break;
        }
    }
    if (!p)
        return -EIO;
    memset(out, 0, sizeof *out);
    while (p < end) {
        const char *tok;

        while (p < end && (*p == ' ' || *p == '\n'))
            p++;
        if (p >= end)
            break;
        tok = p;
        while (p < end && *p != ' ' && *p != '\n')
            p++;
        if (field == 3) {
            out->state = tok[0];
        } else if (field == 4 || field == 5 || field == 6 || field == 9 || field == 20 ||
                   field == 22 || field == 52) {
            if (parse_ll(tok, p, &v) < 0)
                return -EIO;
            switch (field) {
            case 4:
                out->ppid = (int)v;
                break;
            case 5:
                out->pgrp = (int)v;
                break;
            case 6:
                out->session = (int)v;
                break;
            case 9:
                out->flags = (unsigned int)v;
                break;
            case 20:
                out->threads = (int)v;
                break;
            case 22:
                out->starttime = (unsigned long long)v;
                break;
            default:
                out->exit_code = (int)v;
                break;
            }
        }
        if (field == 52)
            break;
        field++;
    }
    /* exit_code (field 52) only exists since Linux 3.5: tolerate its absence. */
    if (field <= 22)
        return -EIO;
    return 0;
}

/* /proc/<pid>/stat relative to an open /proc directory fd (or AT_FDCWD). */
static int proc_stat_at(int procfd, int pid, struct rr_proc_stat *out)
{
    char path[48];
    char buf[4096];
    ssize_t n;

    path_num(path, sizeof path, procfd == AT_FDCWD ? "/proc/" : "", (unsigned long)pid, "/stat");
    n = read_small_file(procfd, path, buf, sizeof buf);
    if (n < 0)
        return (int)n;
    if (n == 0)
        return -ESRCH;
    return parse_stat(buf, (size_t)n, out);
}

/* ---- growable pid vector and pid hash set (internal only) --------------- */

struct pidvec {
    int *v;
    size_t n, cap;
};

static int pidvec_push(struct pidvec *pv, int pid)
{
    if (pv->n == pv->cap) {
        size_t ncap = pv->cap ? pv->cap * 2 : 256;
        int *nv;

        if (pv->n >= RR_MAX_PROCS)
            return -ENOMEM;
        if (ncap > RR_MAX_PROCS)
            ncap = RR_MAX_PROCS;
        nv = realloc(pv->v, ncap * sizeof *nv);
        if (!nv)
            return -ENOMEM;
        pv->v = nv;
        pv->cap = ncap;
    }
    pv->v[pv->n++] = pid;
    return 0;
}

/* Open addressing set of positive pids; 0 marks an empty slot. */
struct pidset {
    int *slots;
    size_t cap, n; /* cap is a power of two */
};

static size_t pid_hash(int pid, size_t mask)
{
    uint32_t h = (uint32_t)pid * 2654435761u;
    return (size_t)h & mask;
}

static int pidset_insert_raw(int *slots, size_t cap, int pid)
{
    size_t mask = cap - 1, i = pid_hash(pid, mask);

    while (slots[i] != 0) {
        if (slots[i] == pid)
            return 0;
        i = (i + 1) & mask;
    }
    slots[i] = pid;
    return 1;
}

/* 1 inserted, 0 already present, -ENOMEM. */
static int pidset_add(struct pidset *s, int pid)
{
    int r;

    if ((s->n + 1) * 2 > s->cap) {
        size_t ncap = s->cap ? s->cap * 2 : 1024, i;
        int *ns = calloc(ncap, sizeof *ns);

        if (!ns)
            return -ENOMEM;
        for (i = 0; i < s->cap; i++)
            if (s->slots[i])
                pidset_insert_raw(ns, ncap, s->slots[i]);
        free(s->slots);
        s->slots = ns;
        s->cap = ncap;
    }
    r = pidset_insert_raw(s->slots, s->cap, pid);
    if (r == 1)
        s->n++;
    return r;
}

static int copy_out(const struct pidvec *pv, int *out, int cap)
{
    size_t k = pv->n;

    if (cap > 0 && out) {
        if (k > (size_t)cap)
            k = (size_t)cap;
        if (k)
            memcpy(out, pv->v, k * sizeof *out);
    }
    return pv->n > INT_MAX ? INT_MAX : (int)pv->n;
}

/* ---- pidfd primitives ---------------------------------------------------- */

int rr_pidfd_open(int pid)
{
    long r = syscall(SYS_pidfd_open, pid, 0);

    return r < 0 ? neg_errno() : (int)r;
}

int rr_pidfd_send_signal(int pidfd, int sig)
{
    long r;

    if (pidfd < 0)
        return -EBADF;
    r = syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
    return r < 0 ? neg_errno() : 0;
}

int rr_pidfd_send_signal_many(const int *fds, int n, int sig, int *errs)
{
    int i, ok = 0;

    if (n < 0 || (n > 0 && !fds))
        return -EINVAL;
    for (i = 0; i < n; i++) {
        int r = rr_pidfd_send_signal(fds[i], sig);

        if (errs)
            errs[i] = r;
        if (r == 0)
            ok++;
    }
    return ok;
}

int rr_waitid_pidfd(int pidfd, int nohang, int *status, struct rr_rusage *rusage)
{
    return waitid_pidfd_raw(pidfd, WEXITED | __WALL | (nohang ? WNOHANG : 0), status, rusage);
}

int rr_pidfd_exit_status(int pidfd, int *status)
{
    struct rr_pidfd_info info;
    int r;

    if (pidfd < 0)
        return -EBADF;
    memset(&info, 0, sizeof info);
    info.mask = RR_PIDFD_INFO_EXIT;
    do {
        r = ioctl(pidfd, RR_PIDFD_GET_INFO, &info);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        if (errno == ENOTTY || errno == EINVAL || errno == EOPNOTSUPP)
            return 0; /* kernel (or fd type) without PIDFD_GET_INFO */
        return neg_errno();
    }
    if (!(info.mask & RR_PIDFD_INFO_EXIT))
        return 0; /* not reaped yet, or kernel < 6.15 */
    if (status)
        *status = info.exit_code;
    return 1;
}

/* ---- readiness ----------------------------------------------------------- */

#define RR_POLL_STACK 64

/* A wait of us microseconds as a timespec; NULL (forever) when us < 0. */
static struct timespec *us_timespec(long long us, struct timespec *ts)
{
    if (us < 0)
        return NULL;
    ts->tv_sec = (time_t)(us / 1000000);
    ts->tv_nsec = (long)(us % 1000000) * 1000L;
    return ts;
}

static long long monotonic_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

/* The part of a wait of left microseconds to hand the kernel now.  The kernel
   lets a poll or epoll wait of t end up to t/1000 late (its timer slack for
   such waits, at least the thread's own), so a wait asks for t*1000/1001
   first and then for what is left: it ends at its deadline, give or take the
   thread's slack, whatever its length. */
static long long wait_step_us(long long left)
{
    return left - left / 1001;
}

/* Whole milliseconds for poll/epoll_wait, rounded up so that a wait never
   ends early; -1 stays forever. */
static int us_to_ms(long long us)
{
    long long ms;

    if (us < 0)
        return -1;
    ms = (us + 999) / 1000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

int rr_poll_many(const int *fds, int n, long long timeout_us, unsigned char *ready)
{
    struct timespec ts;
    long long end = timeout_us > 0 ? monotonic_us() + timeout_us : 0, left = timeout_us;
    struct pollfd stackp[RR_POLL_STACK];
    struct pollfd *p = stackp;
    int i, r, count = 0, bad = 0;

    if (n < 0 || (n > 0 && (!fds || !ready)))
        return -EINVAL;
    if (n > RR_POLL_STACK) {
        p = malloc((size_t)n * sizeof *p);
        if (!p)
            return -ENOMEM;
    }
    for (i = 0; i < n; i++) {
        p[i].fd = fds[i];
        p[i].events = POLLIN;
        p[i].revents = 0;
        ready[i] = 0;
    }
    for (;;) {
        r = ppoll(p, (nfds_t)n, us_timespec(left > 0 ? wait_step_us(left) : left, &ts), NULL);
        if (r != 0 || left <= 0 || (left = end - monotonic_us()) <= 0)
            break;
    }
    if (r < 0) {
        r = neg_errno(); /* -EINTR included: the caller retries */
        goto out;
    }
    for (i = 0; i < n; i++) {
        if (p[i].revents & POLLNVAL)
            bad = 1;
        else if (p[i].revents & (POLLIN | POLLHUP | POLLERR)) {
            ready[i] = 1;
            count++;
        }
    }
    r = bad ? -EBADF : count;
out:
    if (p != stackp)
        free(p);
    return r;
}

/* ---- epoll set of pidfds ------------------------------------------------- */

int rr_epoll_create(void)
{
    int r = epoll_create1(EPOLL_CLOEXEC);

    return r < 0 ? neg_errno() : r;
}

int rr_epoll_add(int epfd, int fd, unsigned long long token)
{
    struct epoll_event ev;

    if (fd < 0)
        return -EBADF;
    if (token > RR_TOKEN_MAX)
        return -EOVERFLOW;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.u64 = (token << 32) | (uint32_t)fd;
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? neg_errno() : 0;
}

int rr_epoll_del(int epfd, int fd)
{
    struct epoll_event ev;

    if (fd < 0)
        return -EBADF;
    memset(&ev, 0, sizeof ev); /* kernels before 2.6.9 want non-NULL */
    return epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev) < 0 ? neg_errno() : 0;
}

/* 1 once epoll_pwait2 was refused (ENOSYS: kernel < 5.11; EPERM: a seccomp
   filter that does not know it): every later wait goes to epoll_wait. */
static int no_pwait2;

/* One epoll wait of us microseconds (-1: forever), to the microsecond where the
   kernel can; returns the count or -1 with errno set. */
static int epoll_wait_once(int epfd, struct epoll_event *evs, int n, long long us)
{
    if (!__atomic_load_n(&no_pwait2, __ATOMIC_RELAXED)) {
        struct timespec ts;
        long r = syscall(SYS_epoll_pwait2, epfd, evs, n, us_timespec(us, &ts), NULL, 0);

        if (r >= 0 || (errno != ENOSYS && errno != EPERM))
            return (int)r;
        __atomic_store_n(&no_pwait2, 1, __ATOMIC_RELAXED);
    }
    return epoll_wait(epfd, evs, n, us_to_ms(us));
}

/* epoll_wait until us microseconds have passed (-1: forever), in the steps of
   wait_step_us; returns the count or -1 with errno set. */
static int epoll_wait_us(int epfd, struct epoll_event *evs, int n, long long us)
{
    long long end = us > 0 ? monotonic_us() + us : 0;

    for (;;) {
        int r = epoll_wait_once(epfd, evs, n, us > 0 ? wait_step_us(us) : us);

        if (r != 0 || us <= 0 || (us = end - monotonic_us()) <= 0)
            return r;
    }
}

int rr_epoll_drain(int epfd, long long timeout_us, struct rr_event *events, int cap)
{
    struct epoll_event evs[RR_EPOLL_CHUNK];
    long long timeout = timeout_us < 0 ? -1 : timeout_us;
    int filled = 0;
    int rounds = cap / RR_EPOLL_CHUNK + 2;

    if (!events || cap <= 0)
        return -EINVAL;
    while (filled < cap && rounds-- > 0) {
        int want = cap - filled, n, i;

        if (want > RR_EPOLL_CHUNK)
            want = RR_EPOLL_CHUNK;
        n = epoll_wait_us(epfd, evs, want, timeout);
        if (n < 0) {
            if (filled > 0)
                break; /* report what we already took out of the set */
            return neg_errno(); /* -EINTR included: the caller retries */
        }
        for (i = 0; i < n; i++) {
            struct rr_event *e = &events[filled];
            int fd = (int)(uint32_t)(evs[i].data.u64 & 0xFFFFFFFFULL);
            int st = 0, r;

            memset(e, 0, sizeof *e);
            r = waitid_pidfd_raw(fd, WEXITED | __WALL | WNOHANG, &st, &e->rusage);
            if (r == 0)
                continue; /* readable yet not exited: leave it in the set */
            (void)rr_epoll_del(epfd, fd);
            e->token = evs[i].data.u64 >> 32;
            e->fd = fd;
            if (r == 1) {
                e->result = 1;
                e->have_status = 1;
                e->status = st;
            } else if (r == -ECHILD) {
                /* not our child (or reaped elsewhere): the kernel may still
                   know its exit status */
                e->result = 0;
                if (rr_pidfd_exit_status(fd, &st) == 1) {
                    e->have_status = 1;
                    e->status = st;
                }
            } else {
                e->result = r;
            }
            filled++;
        }
        if (n < want)
            break;
        timeout = 0; /* more may be ready: collect them without waiting */
    }
    return filled;
}

/* ---- subreaper ----------------------------------------------------------- */

int rr_set_child_subreaper(int on)
{
    return prctl(PR_SET_CHILD_SUBREAPER, on ? 1UL : 0UL, 0UL, 0UL, 0UL) < 0 ? neg_errno() : 0;
}

int rr_get_child_subreaper(void)
{
    int v = 0;

    if (prctl(PR_GET_CHILD_SUBREAPER, (unsigned long)&v, 0UL, 0UL, 0UL) < 0)
        return neg_errno();
    return v ? 1 : 0;
}

/* ---- /proc ----------------------------------------------------------------- */

int rr_proc_stat(int pid, struct rr_proc_stat *out)
{
    struct rr_proc_stat tmp;
    int r;

    if (pid <= 0)
        return -ESRCH;
    if (!out)
        return -EINVAL;
    r = proc_stat_at(AT_FDCWD, pid, &tmp);
    if (r == 0)
        *out = tmp;
    return r;
}

static int open_proc(void)
{
    int fd;

    do {
        fd = open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    return fd < 0 ? neg_errno() : fd;
}

/* Errors that mean "this process (or its view) is gone": skip it. */
static int vanished(int err)
{
    return err == -ENOENT || err == -ESRCH || err == -EACCES || err == -EPERM;
}

/* 1 when /proc/<pid>/task/<tid>/children exists (CONFIG_PROC_CHILDREN).
   Building with -DRR_FORCE_PROC_SCAN forces the /proc/<pid>/stat scan so that
   the test driver (make sanitize / valgrind) covers the fallback too. */
static int have_children_files(void)
{
#ifdef RR_FORCE_PROC_SCAN
    return 0;
#else
    static int cached = -1;
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);

    if (v < 0) {
        char path[64];

        path_num(path, sizeof path, "/proc/self/task/", (unsigned long)syscall(SYS_gettid),
                 "/children");
        v = access(path, R_OK) == 0 ? 1 : 0;
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
#endif
}

static int add_found(int pid, struct pidset *seen, struct pidvec *found)
{
    int a = pidset_add(seen, pid);

    if (a < 0)
        return a;
    return a == 1 ? pidvec_push(found, pid) : 0;
}

/* Append the children listed in one children file to found/seen. */
static int read_children_file(int dirfd, const char *path, struct pidset *seen,
                              struct pidvec *found)
{
    char buf[4096];
    long cur = -1; /* number being parsed; it may span two reads */
    int fd, r = 0;

    do {
        fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return neg_errno();
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf), i;

        if (n < 0) {
            if (errno == EINTR)
                continue;
            r = neg_errno();
            break;
        }
        for (i = 0; i < n && r == 0; i++) {
            char c = buf[i];

            if (c >= '0' && c <= '9') {
                cur = (cur < 0 ? 0 : cur) * 10 + (c - '0');
                if (cur > INT_MAX)
                    cur = INT_MAX;
            } else if (cur >= 0) {
                if (cur > 0)
                    r = add_found((int)cur, seen, found);
                cur = -1;
            }
        }
        if (r < 0)
            break;
        if (n == 0) {
            if (cur > 0)
                r = add_found((int)cur, seen, found);
            break;
        }
    }
    close(fd);
    return r;
}

/* Children of pid: every thread's children file. */
static int children_of(int procfd, int pid, struct pidset *seen, struct pidvec *found)
{
    char path[48];
    DIR *d;
    struct dirent *de;
    int taskfd, r = 0;

    path_num(path, sizeof path, "", (unsigned long)pid, "/task");
    do {
        taskfd = openat(procfd, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } while (taskfd < 0 && errno == EINTR);
    if (taskfd < 0) {
        r = neg_errno();
        return vanished(r) ? 0 : r;
    }
    d = fdopendir(taskfd);
    if (!d) {
        r = neg_errno();
        close(taskfd);
        return r;
    }
    while ((de = readdir(d)) != NULL) {
        int tid = parse_pid_name(de->d_name);

        if (tid < 0)
            continue;
        path_num(path, sizeof path, "", (unsigned long)tid, "/children");
        r = read_children_file(dirfd(d), path, seen, found);
        if (r < 0 && !vanished(r))
            break;
        r = 0;
    }
    closedir(d);
    return r;
}

static int descendants_children_files(int procfd, const int *roots, int nroots,
                                      struct pidset *seen, struct pidvec *found)
{
    size_t qi;
    int i, r;

    for (i = 0; i < nroots; i++)
        if ((r = pidset_add(seen, roots[i])) < 0)
            return r;
    for (i = 0; i < nroots; i++)
        if ((r = children_of(procfd, roots[i], seen, found)) < 0)
            return r;
    for (qi = 0; qi < found->n; qi++)
        if ((r = children_of(procfd, found->v[qi], seen, found)) < 0)
            return r;
    return 0;
}

struct proc_ent {
    int pid, ppid;
};

static int cmp_by_ppid(const void *a, const void *b)
{
    const struct proc_ent *x = a, *y = b;

    if (x->ppid != y->ppid)
        return x->ppid < y->ppid ? -1 : 1;
    return x->pid < y->pid ? -1 : (x->pid > y->pid);
}

/* One pass over /proc/[0-9]*: calls back with each readable stat. */
typedef int (*proc_visit_fn)(int pid, const struct rr_proc_stat *st, void *ctx);

static int scan_proc(int procfd, proc_visit_fn fn, void *ctx)
{
    DIR *d;
    struct dirent *de;
    int dfd, r = 0;

    do {
        dfd = openat(procfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } while (dfd < 0 && errno == EINTR);
    if (dfd < 0)
        return neg_errno();
    d = fdopendir(dfd);
    if (!d) {
        r = neg_errno();
        close(dfd);
        return r;
    }
    while ((de = readdir(d)) != NULL) {
        struct rr_proc_stat st;
        int pid = parse_pid_name(de->d_name);

        if (pid < 0)
            continue;
        r = proc_stat_at(procfd, pid, &st);
        if (r < 0) {
            if (vanished(r) || r == -EIO) {
                r = 0;
                continue;
            }
            break;
        }
        if ((r = fn(pid, &st, ctx)) < 0)
            break;
    }
    closedir(d);
    return r;
}

struct ent_table {
    struct proc_ent *e;
    size_t n, cap;
};

static int collect_ent(int pid, const struct rr_proc_stat *st, void *ctx)
{
    struct ent_table *t = ctx;

    if (t->n == t->cap) {
        size_t ncap = t->cap ? t->cap * 2 : 1024;
        struct proc_ent *ne;

        if (t->n >= RR_MAX_PROCS)
            return -ENOMEM;
        ne = realloc(t->e, ncap * sizeof *ne);
        if (!ne)
            return -ENOMEM;
        t->e = ne;
        t->cap = ncap;
    }
    t->e[t->n].pid = pid;
    t->e[t->n].ppid = st->ppid;
    t->n++;
    return 0;
}

/* First index in the ppid-sorted table with ppid >= key. */
static size_t lower_bound_ppid(const struct ent_table *t, int key)
{
    size_t lo = 0, hi = t->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if (t->e[mid].ppid < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int descendants_scan(int procfd, const int *roots, int nroots, struct pidset *seen,
                            struct pidvec *found)
{
    struct ent_table t = {NULL, 0, 0};
    size_t qi;
    int i, r;

    r = scan_proc(procfd, collect_ent, &t);
    if (r < 0)
        goto out;
    if (t.n > 1)
        qsort(t.e, t.n, sizeof *t.e, cmp_by_ppid);
    for (i = 0; i < nroots; i++)
        if ((r = pidset_add(seen, roots[i])) < 0)
            goto out;
    /* BFS: the queue is roots first, then everything found. */
    for (qi = 0; qi < (size_t)nroots + found->n; qi++) {
        int parent = qi < (size_t)nroots ? roots[qi] : found->v[qi - (size_t)nroots];
        size_t k = lower_bound_ppid(&t, parent);

        for (; k < t.n && t.e[k].ppid == parent; k++)
            if ((r = add_found(t.e[k].pid, seen, found)) < 0)
                goto out;
    }
    r = 0;
out:
    free(t.e);
    return r;
}

int rr_list_descendants(const int *roots, int nroots, int *out, int cap)
{
    struct pidset seen = {NULL, 0, 0};
    struct pidvec found = {NULL, 0, 0};
    int i, r, procfd;

    if (nroots < 0 || (nroots > 0 && !roots) || cap < 0 || (cap > 0 && !out))
        return -EINVAL;
    for (i = 0; i < nroots; i++)
        if (roots[i] <= 0)
            return -EINVAL;
    if (nroots == 0)
        return 0;
    procfd = open_proc();
    if (procfd < 0)
        return procfd;
    if (have_children_files())
        r = descendants_children_files(procfd, roots, nroots, &seen, &found);
    else
        r = descendants_scan(procfd, roots, nroots, &seen, &found);
    close(procfd);
    if (r == 0)
        r = copy_out(&found, out, cap);
    free(seen.slots);
    free(found.v);
    return r;
}

struct session_ctx {
    int sid;
    struct pidvec found;
};

static int collect_session(int pid, const struct rr_proc_stat *st, void *ctx)
{
    struct session_ctx *c = ctx;

    return st->session == c->sid ? pidvec_push(&c->found, pid) : 0;
}

int rr_list_session(int sid, int *out, int cap)
{
    struct session_ctx c;
    int r, procfd;

    if (sid <= 0 || cap < 0 || (cap > 0 && !out))
        return -EINVAL;
    memset(&c, 0, sizeof c);
    c.sid = sid;
    procfd = open_proc();
    if (procfd < 0)
        return procfd;
    r = scan_proc(procfd, collect_session, &c);
    close(procfd);
    if (r == 0)
        r = copy_out(&c.found, out, cap);
    free(c.found.v);
    return r;
}
