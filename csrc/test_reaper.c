/*
 * Test driver for csrc/reaper.c, run under sanitizers and valgrind by the
 * Makefile (make sanitize / make valgrind).  Every check runs against real
 * processes this driver forks itself; the driver makes itself a child
 * subreaper so that every descendant, orphaned or not, is reaped here.
 *
 * After fork() the children only make async-signal-safe calls.
 *
 * Valgrind <= 3.19 does not know pidfd_open(2) and pidfd_send_signal(2) and
 * fails them with ENOSYS.  The driver detects that, then gets its children's
 * pidfds from clone(CLONE_PIDFD), signals with kill(2) (only processes it
 * forked and has not reaped yet, so pids cannot have been reused), and skips
 * the checks that need those two syscalls; it says which.
 *
 * Prints "N passed, M failed" last and exits non-zero when M > 0.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "reaper.h"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif

static int passed, failed, skipped;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (cond) {                                                        \
            passed++;                                                      \
        } else {                                                           \
            failed++;                                                      \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fputc('\n', stderr);                                           \
        }                                                                  \
    } while (0)

#define SKIP(what)                                                         \
    do {                                                                   \
        skipped++;                                                         \
        fprintf(stderr, "SKIP %s:%d: %s (pidfd syscalls unavailable)\n", __FILE__, __LINE__, what); \
    } while (0)

/* Safety net: a child left behind by a crashed driver dies within 60 s. */
#define CHILD_TTL 60

static int kernel_has_exit_info; /* Linux >= 6.15: PIDFD_INFO_EXIT */
static int pidfd_syscalls;       /* pidfd_open/pidfd_send_signal work */

/* One fd through rr_poll_many: 1 readable, 0 timed out, -errno. */
static int poll_one(int fd, int timeout_ms)
{
    unsigned char ready = 0;
    int r = rr_poll_many(&fd, 1, timeout_ms * 1000LL, &ready);

    return r < 0 ? r : ready;
}

static void detect_environment(void)
{
    struct utsname u;
    int major = 0, minor = 0, fd;

    if (uname(&u) == 0 && sscanf(u.release, "%d.%d", &major, &minor) == 2)
        kernel_has_exit_info = major > 6 || (major == 6 && minor >= 15);
    fd = rr_pidfd_open(getpid());
    pidfd_syscalls = fd >= 0;
    if (fd >= 0)
        close(fd);
    else
        fprintf(stderr, "note: pidfd_open -> %d (%s); running the reduced suite\n", fd,
                strerror(-fd));
}

static void child_pause_forever(void)
{
    for (;;)
        pause();
}

/* fork() returning a pidfd for the child in *pidfd (parent side). */
static pid_t fork_pidfd(int *pidfd)
{
    pid_t p;

    *pidfd = -1;
    if (pidfd_syscalls) {
        p = fork();
        if (p > 0) {
            *pidfd = rr_pidfd_open(p);
            CHECK(*pidfd >= 0, "pidfd_open(child) -> %d", *pidfd);
        }
        return p;
    }
    return (pid_t)syscall(SYS_clone, CLONE_PIDFD | SIGCHLD, 0, pidfd, 0, 0);
}

/* Signal through the pidfd, or with kill(2) on a pid we have not reaped. */
static int signal_proc(int pidfd, pid_t pid, int sig)
{
    if (pidfd_syscalls && pidfd >= 0)
        return rr_pidfd_send_signal(pidfd, sig);
    return kill(pid, sig) < 0 ? -errno : 0;
}

static pid_t spawn_exit(int code, int *pidfd)
{
    pid_t p = fork_pidfd(pidfd);

    if (p == 0)
        _exit(code);
    return p;
}

static pid_t spawn_pause(int *pidfd)
{
    pid_t p = fork_pidfd(pidfd);

    if (p == 0) {
        alarm(CHILD_TTL);
        child_pause_forever();
    }
    return p;
}

/* Read exactly n bytes from a pipe; 0 on success. */
static int read_full(int fd, void *buf, size_t n)
{
    char *p = buf;

    while (n > 0) {
        ssize_t r = read(fd, p, n);

        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* SIGKILL every listed live process (none reaped yet), close the fds. */
/* (pids[i] == 0: already signalled; its fd is still closed.) */
static void kill_all(const int *fds, const pid_t *pids, int n)
{
    int i;

    for (i = 0; i < n; i++) {
        if (pids[i] > 0)
            signal_proc(fds ? fds[i] : -1, pids[i], SIGKILL);
        if (fds && fds[i] >= 0)
            close(fds[i]);
    }
}

/* Reap everything below the driver (it is a subreaper: orphans come here). */
static void reap_all(void)
{
    for (;;) {
        pid_t r = waitpid(-1, NULL, __WALL);

        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            break;
    }
}

static int contains(const int *v, int n, int x)
{
    int i;

    for (i = 0; i < n; i++)
        if (v[i] == x)
            return 1;
    return 0;
}

/* ---- tests --------------------------------------------------------------- */

static void test_subreaper(void)
{
    int was = rr_get_child_subreaper();

    CHECK(was == 0 || was == 1, "get_child_subreaper -> %d", was);
    CHECK(rr_set_child_subreaper(1) == 0, "set 1");
    CHECK(rr_get_child_subreaper() == 1, "get after set 1");
    CHECK(rr_set_child_subreaper(0) == 0, "set 0");
    CHECK(rr_get_child_subreaper() == 0, "get after set 0");
    /* The rest of the driver relies on it: orphans come back to us. */
    CHECK(rr_set_child_subreaper(1) == 0, "set 1 again");
}

static void test_exit_status_decoding(void)
{
    struct rr_rusage ru;
    int status = -1, fd, r;
    pid_t p;

    /* exit code 3, blocking waitid */
    p = spawn_exit(3, &fd);
    CHECK(p > 0 && fd >= 0, "spawn -> %d fd %d", p, fd);
    memset(&ru, 0xff, sizeof ru);
    r = rr_waitid_pidfd(fd, 0, &status, &ru);
    CHECK(r == 1, "waitid blocking -> %d", r);
    CHECK(status == (3 << 8), "exit 3 status %#x", status);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 3, "WEXITSTATUS %#x", status);
    CHECK(ru.utime_s >= 0.0 && ru.stime_s >= 0.0 && ru.maxrss_kb > 0, "rusage %f %f %ld",
          ru.utime_s, ru.stime_s, ru.maxrss_kb);
    r = rr_waitid_pidfd(fd, 1, &status, NULL);
    CHECK(r == -ECHILD, "second waitid -> %d", r);
    close(fd);

    /* SIGKILL of a running child, WNOHANG before and after */
    p = spawn_pause(&fd);
    r = rr_waitid_pidfd(fd, 1, &status, &ru);
    CHECK(r == 0, "WNOHANG on running child -> %d", r);
    r = poll_one(fd, 0);
    CHECK(r == 0, "poll running -> %d", r);
    r = rr_pidfd_exit_status(fd, &status);
    CHECK(r == 0, "exit_status running -> %d", r);
    if (pidfd_syscalls) {
        r = rr_pidfd_send_signal(fd, 0);
        CHECK(r == 0, "signal 0 -> %d", r);
    } else {
        SKIP("pidfd_send_signal(0)");
    }
    r = signal_proc(fd, p, SIGKILL);
    CHECK(r == 0, "SIGKILL -> %d", r);
    r = poll_one(fd, -1);
    CHECK(r == 1, "poll after kill -> %d", r);
    /* A zombie still accepts signals; its exit info appears only once reaped. */
    r = rr_pidfd_exit_status(fd, &status);
    CHECK(r == 0, "exit_status of our zombie -> %d", r);
    r = rr_waitid_pidfd(fd, 1, &status, &ru);
    CHECK(r == 1, "waitid after kill -> %d", r);
    CHECK(status == SIGKILL, "SIGKILL status %#x", status);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "WTERMSIG %#x", status);
    status = -1;
    r = rr_pidfd_exit_status(fd, &status);
    if (kernel_has_exit_info) {
        CHECK(r == 1, "exit_status after reap -> %d", r);
        CHECK(status == SIGKILL, "exit info status %#x", status);
    } else {
        CHECK(r == 0 || r == -ESRCH, "exit_status after reap (old kernel) -> %d", r);
    }
    if (pidfd_syscalls) {
        r = rr_pidfd_send_signal(fd, 0);
        CHECK(r == -ESRCH, "signal reaped -> %d", r);
    } else {
        SKIP("pidfd_send_signal on a reaped process");
    }
    close(fd);

    /* exit 255, reaped by waitpid(2): status via exit info */
    p = spawn_exit(255, &fd);
    CHECK(waitpid(p, &status, 0) == p, "waitpid");
    CHECK(status == 0xff00, "waitpid status %#x", status);
    status = -1;
    r = rr_pidfd_exit_status(fd, &status);
    if (kernel_has_exit_info)
        CHECK(r == 1 && status == 0xff00, "exit info 255 -> %d %#x", r, status);
    else
        CHECK(r == 0 || r == -ESRCH, "exit info 255 (old kernel) -> %d", r);
    close(fd);
}

/* A pidfd whose process someone else reaped: drain reports result 0 and
   takes the status from PIDFD_INFO_EXIT (Linux >= 6.15). */
static void test_drain_reaped_elsewhere(void)
{
    struct rr_event ev[2];
    int fd, ep = rr_epoll_create(), r, status = 0;
    pid_t p = spawn_exit(9, &fd);

    CHECK(ep >= 0, "epoll_create -> %d", ep);
    CHECK(rr_epoll_add(ep, fd, 4242) == 0, "epoll_add");
    CHECK(waitpid(p, &status, 0) == p && status == (9 << 8), "waitpid %#x", status);
    memset(ev, 0, sizeof ev);
    r = rr_epoll_drain(ep, 10000000LL, ev, 2);
    CHECK(r == 1, "drain -> %d", r);
    CHECK(ev[0].token == 4242 && ev[0].fd == fd, "token %llu fd %d", ev[0].token, ev[0].fd);
    CHECK(ev[0].result == 0, "result %d", ev[0].result);
    if (kernel_has_exit_info)
        CHECK(ev[0].have_status == 1 && ev[0].status == (9 << 8), "have %d status %#x",
              ev[0].have_status, ev[0].status);
    else
        CHECK(ev[0].have_status == 0, "have %d (old kernel)", ev[0].have_status);
    CHECK(rr_epoll_drain(ep, 0, ev, 2) == 0, "removed from the set");
    close(fd);
    close(ep);
}

/* A child that forks a grandchild, reports its pid, reaps it when told to
   exit, reports "reaped", then waits to be killed. */
static void test_non_child(void)
{
    int up[2], down[2], fd, cfd, r, status = -1, epfd;
    pid_t child, gc = -1;
    char c = 0;
    struct rr_event ev[4];

    if (!pidfd_syscalls) {
        SKIP("pidfd_open on a grandchild");
        return;
    }
    if (pipe(up) < 0 || pipe(down) < 0) {
        CHECK(0, "pipe: %s", strerror(errno));
        return;
    }
    child = fork_pidfd(&cfd);
    if (child == 0) {
        pid_t g;

        alarm(CHILD_TTL);
        close(up[0]);
        close(down[1]);
        g = fork();
        if (g == 0) {
            char x;

            alarm(CHILD_TTL);
            /* exit 42 when the pipe is closed */
            while (read(down[0], &x, 1) < 0 && errno == EINTR)
                ;
            _exit(42);
        }
        if (write(up[1], &g, sizeof g) != (ssize_t)sizeof g)
            _exit(1);
        while (waitpid(g, NULL, 0) < 0 && errno == EINTR)
            ;
        if (write(up[1], "r", 1) != 1)
            _exit(1);
        child_pause_forever();
    }
    close(up[1]);
    close(down[0]);
    CHECK(read_full(up[0], &gc, sizeof gc) == 0, "read gc pid");
    fd = rr_pidfd_open(gc);
    CHECK(fd >= 0, "pidfd_open(grandchild) -> %d", fd);
    r = rr_waitid_pidfd(fd, 1, &status, NULL);
    CHECK(r == -ECHILD, "waitid on non-child -> %d", r);
    epfd = rr_epoll_create();
    CHECK(epfd >= 0, "epoll_create -> %d", epfd);
    r = rr_epoll_add(epfd, fd, 77);
    CHECK(r == 0, "epoll_add -> %d", r);
    /* Let the grandchild exit and wait until its parent has reaped it. */
    close(down[1]);
    CHECK(read_full(up[0], &c, 1) == 0 && c == 'r', "child reaped grandchild");
    memset(ev, 0, sizeof ev);
    r = rr_epoll_drain(epfd, 5000000LL, ev, 4);
    CHECK(r == 1, "drain non-child -> %d", r);
    if (r == 1) {
        CHECK(ev[0].token == 77 && ev[0].fd == fd, "token %llu fd %d", ev[0].token, ev[0].fd);
        CHECK(ev[0].result == 0, "result %d", ev[0].result);
        if (kernel_has_exit_info)
            CHECK(ev[0].have_status == 1 && ev[0].status == (42 << 8), "have %d status %#x",
                  ev[0].have_status, ev[0].status);
    }
    r = rr_pidfd_exit_status(fd, &status);
    if (kernel_has_exit_info)
        CHECK(r == 1 && status == (42 << 8), "exit_status non-child -> %d %#x", r, status);
    else
        CHECK(r == 0 || r == -ESRCH, "exit_status non-child (old kernel) -> %d", r);
    r = rr_epoll_del(epfd, fd);
    CHECK(r == -ENOENT, "drained fd no longer in the set -> %d", r);
    close(fd);
    close(epfd);
    close(up[0]);
    kill_all(&cfd, &child, 1);
    reap_all();
}

static void test_poll_many(void)
{
    int fds[3], r, i, many[100], pfd;
    unsigned char ready[3], rd[100];
    pid_t pids[3];

    pids[0] = spawn_pause(&fds[0]);
    pids[1] = 0;
    fds[1] = -1; /* ignored by poll */
    pids[2] = spawn_pause(&fds[2]);
    r = rr_poll_many(fds, 3, 0, ready);
    CHECK(r == 0 && !ready[0] && !ready[1] && !ready[2], "poll_many none -> %d", r);
    signal_proc(fds[2], pids[2], SIGKILL);
    r = rr_poll_many(fds, 3, 10000000LL, ready);
    CHECK(r == 1 && !ready[0] && !ready[1] && ready[2], "poll_many one -> %d [%d %d %d]", r,
          ready[0], ready[1], ready[2]);
    r = rr_poll_many(NULL, 0, 0, NULL);
    CHECK(r == 0, "poll_many empty -> %d", r);
    r = rr_poll_many(fds, -1, 0, ready);
    CHECK(r == -EINVAL, "poll_many n<0 -> %d", r);
    pids[2] = 0; /* already killed */
    kill_all(fds, pids, 3);
    reap_all();

    /* more fds than the C side's stack array */
    spawn_exit(0, &pfd);
    for (i = 0; i < 100; i++)
        many[i] = -1;
    many[99] = pfd;
    r = rr_poll_many(many, 100, 10000000LL, rd);
    CHECK(r == 1 && rd[99] == 1 && rd[0] == 0, "poll_many 100 -> %d", r);
    close(pfd);
    reap_all();
}

static long long now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

/* Timeouts are microseconds: a wait of 1.3 ms on a live child times out (0),
   and never before its 1.3 ms (a lower bound only: how late the kernel wakes
   is the machine's business, not a test's). */
static void test_timeouts_in_microseconds(void)
{
    int fd, ep = rr_epoll_create(), r;
    struct rr_event ev[2];
    unsigned char ready = 0;
    pid_t p = spawn_pause(&fd);
    long long t0;

    CHECK(ep >= 0 && rr_epoll_add(ep, fd, 7) == 0, "epoll set of one live child");
    t0 = now_us();
    r = rr_epoll_drain(ep, 1300, ev, 2);
    CHECK(r == 0 && now_us() - t0 >= 1300, "drain 1300 us -> %d after %lld us", r, now_us() - t0);
    t0 = now_us();
    r = rr_poll_many(&fd, 1, 1300, &ready);
    CHECK(r == 0 && !ready && now_us() - t0 >= 1300, "poll_many 1300 us -> %d", r);
    kill_all(&fd, &p, 1);
    reap_all();
    close(ep);
}

#ifndef SYS_epoll_pwait2
#define SYS_epoll_pwait2 441
#endif

/* In this process from now on, epoll_pwait2 fails with err (as on a kernel
   before 5.11, or under a seccomp filter that does not know the call). */
static int refuse_pwait2(int err)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_epoll_pwait2, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ((unsigned)err & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { (unsigned short)(sizeof f / sizeof f[0]), f };

    if (prctl(PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) < 0)
        return -errno;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0UL, 0UL) < 0 ? -errno : 0;
}

/* The drain where epoll_pwait2 is refused, in a child (a seccomp filter cannot
   be taken back): its exit code is the bit mask of the checks that failed, 64
   when it could not set up, so that the child needs no stdio; 65 when the
   refusal cannot be made (valgrind answers epoll_pwait2 itself, ENOSYS). */
static int drain_without_pwait2(int err)
{
    struct rr_event ev[2];
    int fd, ep, r, bad = 0;
    pid_t p;
    long long t0;

    if (refuse_pwait2(err) < 0)
        return 64;
    if (syscall(SYS_epoll_pwait2, -1, NULL, 0, NULL, NULL, 0) != -1 || errno != err)
        return 65;
    ep = rr_epoll_create();
    p = spawn_pause(&fd);
    if (ep < 0 || p <= 0 || fd < 0 || rr_epoll_add(ep, fd, 9) != 0)
        return 64;
    /* A timeout with no exit: it ends, and never early (epoll_wait: rounded up). */
    t0 = now_us();
    r = rr_epoll_drain(ep, 1300, ev, 2);
    if (r != 0 || now_us() - t0 < 1300)
        bad |= 1;
    /* An exit: reported, reaped, with its status. */
    signal_proc(fd, p, SIGKILL);
    r = rr_epoll_drain(ep, 10000000LL, ev, 2);
    if (r != 1 || ev[0].token != 9 || ev[0].result != 1)
        bad |= 2;
    else if (!WIFSIGNALED(ev[0].status) || WTERMSIG(ev[0].status) != SIGKILL)
        bad |= 4;
    /* Waiting forever still wakes for an exit. */
    close(fd);
    p = spawn_exit(5, &fd);
    if (p <= 0 || fd < 0 || rr_epoll_add(ep, fd, 10) != 0)
        return bad | 64;
    r = rr_epoll_drain(ep, -1, ev, 2);
    if (r != 1 || ev[0].token != 10 || !WIFEXITED(ev[0].status) || WEXITSTATUS(ev[0].status) != 5)
        bad |= 8;
    close(fd);
    close(ep);
    return bad;
}

static void test_timeouts_without_pwait2(void)
{
    static const int errs[] = { ENOSYS, EPERM };
    size_t i;

    for (i = 0; i < sizeof errs / sizeof errs[0]; i++) {
        int status = 0;
        pid_t c = fork();

        if (c == 0)
            _exit(drain_without_pwait2(errs[i]));
        CHECK(c > 0 && waitpid(c, &status, 0) == c, "fork/wait the refusing child");
        if (WIFEXITED(status) && WEXITSTATUS(status) == 65) {
            skipped++;
            fprintf(stderr, "SKIP %s:%d: epoll_pwait2 cannot be refused with %s here (valgrind "
                    "answers it itself)\n", __FILE__, __LINE__, strerror(errs[i]));
            continue;
        }
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "drain with epoll_pwait2 refused (%s): failed checks, mask %d", strerror(errs[i]),
              WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    }
}

#define N_EPOLL 50

static void test_epoll_drain(void)
{
    int epfd = rr_epoll_create(), i, r, got = 0, seen[N_EPOLL], fds[N_EPOLL];
    struct rr_event ev[16];
    int loops = 0;

    CHECK(epfd >= 0, "epoll_create -> %d", epfd);
    memset(seen, 0, sizeof seen);
    r = rr_epoll_drain(epfd, 0, ev, 16);
    CHECK(r == 0, "drain empty -> %d", r);
    for (i = 0; i < N_EPOLL; i++) {
        pid_t p = spawn_exit(i, &fds[i]);

        CHECK(p > 0 && fds[i] >= 0, "spawn %d -> %d fd %d", i, p, fds[i]);
        r = rr_epoll_add(epfd, fds[i], 1000ULL + (unsigned long long)i);
        CHECK(r == 0, "epoll_add %d -> %d", i, r);
    }
    r = rr_epoll_add(epfd, fds[0], 5);
    CHECK(r == -EEXIST, "double add -> %d", r);
    while (got < N_EPOLL && loops++ < 1000) {
        r = rr_epoll_drain(epfd, 10000000LL, ev, 16);
        CHECK(r > 0 && r <= 16, "drain -> %d", r);
        if (r <= 0)
            break;
        for (i = 0; i < r; i++) {
            int k = (int)(ev[i].token - 1000ULL);

            if (k < 0 || k >= N_EPOLL) {
                CHECK(0, "bad token %llu", ev[i].token);
                continue;
            }
            CHECK(!seen[k], "token %d seen twice", k);
            seen[k] = 1;
            CHECK(ev[i].fd == fds[k], "fd %d vs %d", ev[i].fd, fds[k]);
            CHECK(ev[i].result == 1 && ev[i].have_status == 1, "result %d have %d",
                  ev[i].result, ev[i].have_status);
            CHECK(ev[i].status == (k << 8), "status %#x for %d", ev[i].status, k);
            CHECK(ev[i].rusage.maxrss_kb > 0, "maxrss %ld", ev[i].rusage.maxrss_kb);
            got++;
        }
    }
    CHECK(got == N_EPOLL, "drained %d of %d", got, N_EPOLL);
    r = rr_epoll_drain(epfd, 0, ev, 16);
    CHECK(r == 0, "drain after all -> %d", r);
    for (i = 0; i < N_EPOLL; i++)
        close(fds[i]);
    close(epfd);
    CHECK(waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD, "no child left unreaped");
}

static void test_proc_stat(void)
{
    struct rr_proc_stat st;
    int r, fd;
    pid_t p;

    memset(&st, 0, sizeof st);
    r = rr_proc_stat(getpid(), &st);
    CHECK(r == 0, "proc_stat self -> %d", r);
    CHECK(st.state == 'R', "state %c", st.state);
    CHECK(st.ppid == getppid(), "ppid %d vs %d", st.ppid, getppid());
    CHECK(st.pgrp == getpgrp(), "pgrp %d", st.pgrp);
    CHECK(st.session == getsid(0), "session %d", st.session);
    CHECK(st.starttime > 0, "starttime %llu", st.starttime);
    CHECK(st.exit_code == 0, "exit_code %d", st.exit_code);

    p = spawn_exit(7, &fd);
    CHECK(poll_one(fd, 10000) == 1, "zombie readable");
    r = rr_proc_stat(p, &st);
    CHECK(r == 0, "proc_stat zombie -> %d", r);
    CHECK(st.state == 'Z', "zombie state %c", st.state);
    CHECK(st.exit_code == (7 << 8), "zombie exit_code %#x", st.exit_code);
    CHECK(st.ppid == getpid(), "zombie ppid %d", st.ppid);
    CHECK(rr_waitid_pidfd(fd, 1, NULL, NULL) == 1, "reap zombie");
    close(fd);
    r = rr_proc_stat(p, &st);
    CHECK(r == -ENOENT || (r == 0 && st.ppid != getpid()), "proc_stat reaped -> %d", r);

    r = rr_proc_stat(0, &st);
    CHECK(r == -ESRCH, "proc_stat(0) -> %d", r);
    r = rr_proc_stat(0x3ffffff0, &st);
    CHECK(r == -ENOENT, "proc_stat(huge) -> %d", r);
    r = rr_proc_stat(getpid(), NULL);
    CHECK(r == -EINVAL, "proc_stat NULL -> %d", r);
}

struct rec {
    int level;
    pid_t pid;
};

static void report(int wfd, int level)
{
    struct rec r;

    r.level = level;
    r.pid = getpid();
    if (write(wfd, &r, sizeof r) != (ssize_t)sizeof r)
        _exit(1);
}

static void test_descendants(void)
{
    int pfd[2], i, r, out[8], big[256], fds[3] = {-1, -1, -1}, roots[2];
    pid_t a, lv[4] = {0, 0, 0, 0}, pids[3];
    struct rr_proc_stat st;

    if (pipe(pfd) < 0) {
        CHECK(0, "pipe");
        return;
    }
    a = fork_pidfd(&fds[0]);
    if (a == 0) {
        alarm(CHILD_TTL);
        if (fork() == 0) {
            alarm(CHILD_TTL);
            if (fork() == 0) {
                alarm(CHILD_TTL);
                report(pfd[1], 3);
                child_pause_forever();
            }
            report(pfd[1], 2);
            child_pause_forever();
        }
        report(pfd[1], 1);
        child_pause_forever();
    }
    close(pfd[1]);
    for (i = 0; i < 3; i++) {
        struct rec rc;

        if (read_full(pfd[0], &rc, sizeof rc) == 0 && rc.level >= 1 && rc.level <= 3)
            lv[rc.level] = rc.pid;
    }
    close(pfd[0]);
    CHECK(lv[1] == a && lv[2] > 0 && lv[3] > 0, "tree pids %d %d %d", lv[1], lv[2], lv[3]);
    for (i = 0; i < 3; i++)
        pids[i] = lv[i + 1];
    if (pidfd_syscalls) {
        fds[1] = rr_pidfd_open(lv[2]);
        fds[2] = rr_pidfd_open(lv[3]);
    }

    roots[0] = a;
    r = rr_list_descendants(roots, 1, out, 8);
    CHECK(r == 2, "descendants(a) -> %d", r);
    CHECK(r >= 2 && out[0] == lv[2] && out[1] == lv[3], "BFS order %d %d", out[0], out[1]);
    r = rr_list_descendants(roots, 1, out, 1);
    CHECK(r == 2 && out[0] == lv[2], "cap 1 -> %d (out %d)", r, out[0]);
    r = rr_list_descendants(roots, 1, NULL, 0);
    CHECK(r == 2, "count only -> %d", r);
    roots[1] = lv[2];
    r = rr_list_descendants(roots, 2, out, 8);
    CHECK(r == 1 && out[0] == lv[3], "roots a,b -> %d", r);
    roots[1] = a;
    r = rr_list_descendants(roots, 2, out, 8);
    CHECK(r == 2, "duplicate roots -> %d", r);
    roots[0] = lv[3];
    r = rr_list_descendants(roots, 1, out, 8);
    CHECK(r == 0, "leaf -> %d", r);
    roots[0] = getpid();
    r = rr_list_descendants(roots, 1, big, 256);
    CHECK(r >= 3 && contains(big, r < 256 ? r : 256, a) &&
              contains(big, r < 256 ? r : 256, lv[3]),
          "descendants(self) -> %d", r);
    roots[0] = 0;
    CHECK(rr_list_descendants(roots, 1, out, 8) == -EINVAL, "root 0");
    CHECK(rr_list_descendants(roots, 0, out, 8) == 0, "no roots");
    CHECK(rr_list_descendants(NULL, 1, out, 8) == -EINVAL, "NULL roots");
    roots[0] = a;
    CHECK(rr_list_descendants(roots, 1, NULL, 4) == -EINVAL, "NULL out");
    CHECK(rr_list_descendants(roots, 1, out, -1) == -EINVAL, "cap < 0");
    roots[0] = 0x3ffffff0;
    CHECK(rr_list_descendants(roots, 1, out, 8) == 0, "nonexistent root");

    /* Kill the middle: the leaf is orphaned to us (subreaper) and still found. */
    signal_proc(fds[1], lv[2], SIGKILL);
    memset(&st, 0, sizeof st);
    for (i = 0; i < 10000; i++) {
        if (rr_proc_stat(lv[3], &st) == 0 && st.ppid == getpid())
            break;
        usleep(1000);
    }
    CHECK(st.ppid == getpid(), "leaf reparented to the subreaper: ppid %d", st.ppid);
    roots[0] = getpid();
    r = rr_list_descendants(roots, 1, big, 256);
    CHECK(r > 0 && contains(big, r < 256 ? r : 256, lv[3]), "orphan found -> %d", r);
    pids[1] = 0; /* killed already; its zombie may be reaped by a */
    kill_all(fds, pids, 3);
    reap_all();
}

static void test_session(void)
{
    int pfd[2], r, out[8], fds[2] = {-1, -1}, i;
    pid_t s, gc = -1, pids[2];
    struct rec rc;

    if (pipe(pfd) < 0) {
        CHECK(0, "pipe");
        return;
    }
    s = fork_pidfd(&fds[0]);
    if (s == 0) {
        alarm(CHILD_TTL);
        if (setsid() < 0)
            _exit(1);
        if (fork() == 0) {
            alarm(CHILD_TTL);
            report(pfd[1], 2);
            child_pause_forever();
        }
        child_pause_forever();
    }
    close(pfd[1]);
    if (read_full(pfd[0], &rc, sizeof rc) == 0)
        gc = rc.pid;
    close(pfd[0]);
    pids[0] = s;
    pids[1] = gc;
    if (pidfd_syscalls)
        fds[1] = rr_pidfd_open(gc);
    r = rr_list_session(s, out, 8);
    CHECK(r == 2, "session members -> %d", r);
    CHECK(r == 2 && contains(out, 2, s) && contains(out, 2, gc), "members %d %d", out[0],
          out[1]);
    r = rr_list_session(s, out, 1);
    CHECK(r == 2, "session cap 1 -> %d", r);
    r = rr_list_session(s, NULL, 0);
    CHECK(r == 2, "session count only -> %d", r);
    /* getsid() answers 0 when our session's leader lives in another PID
     * namespace (a container or VM init that never called setsid): there is
     * no session id to list then, and sid 0 is refused below. */
    if (getsid(0) > 0) {
        r = rr_list_session(getsid(0), out, 8);
        CHECK(r >= 1, "own session -> %d", r);
        for (i = 0; i < (r < 8 ? r : 8); i++)
            CHECK(out[i] != s && out[i] != gc, "setsid'd child in our session");
    }
    CHECK(rr_list_session(0, out, 8) == -EINVAL, "sid 0");
    CHECK(rr_list_session(-1, out, 8) == -EINVAL, "sid -1");
    CHECK(rr_list_session(s, NULL, 8) == -EINVAL, "NULL out");
    CHECK(rr_list_session(0x3ffffff0, out, 8) == 0, "no such session");
    kill_all(fds, pids, 2);
    reap_all();
}

static void test_bad_inputs(void)
{
    int p[2], r, st, errs[3], fds[3], ep;
    struct rr_event ev[2];
    pid_t c;

    if (pidfd_syscalls) {
        r = rr_pidfd_open(-1);
        CHECK(r == -EINVAL || r == -ESRCH, "pidfd_open(-1) -> %d", r);
        r = rr_pidfd_open(0);
        CHECK(r == -EINVAL || r == -ESRCH, "pidfd_open(0) -> %d", r);
        r = rr_pidfd_open(0x3ffffff0);
        CHECK(r == -ESRCH, "pidfd_open(huge) -> %d", r);
        CHECK(rr_pidfd_send_signal(4000, 0) == -EBADF, "signal closed fd");
    } else {
        SKIP("pidfd_open / pidfd_send_signal bad inputs");
    }
    CHECK(rr_pidfd_send_signal(-1, 0) == -EBADF, "signal -1");
    CHECK(rr_waitid_pidfd(-1, 1, &st, NULL) == -EBADF, "waitid -1");
    CHECK(rr_waitid_pidfd(4000, 1, &st, NULL) == -EBADF, "waitid closed fd");
    CHECK(rr_pidfd_exit_status(-1, &st) == -EBADF, "exit_status -1");
    CHECK(rr_pidfd_exit_status(4000, &st) == -EBADF, "exit_status closed fd");
    CHECK(poll_one(4000, 0) == -EBADF, "poll closed fd");
    if (pipe(p) == 0) {
        if (pidfd_syscalls) {
            r = rr_pidfd_send_signal(p[0], 0);
            CHECK(r == -EBADF, "signal on a pipe -> %d", r);
        }
        r = rr_waitid_pidfd(p[0], 1, &st, NULL);
        CHECK(r == -EBADF || r == -EINVAL, "waitid on a pipe -> %d", r);
        r = rr_pidfd_exit_status(p[0], &st);
        CHECK(r == 0, "exit_status on a pipe (ENOTTY -> 0) -> %d", r);
        close(p[0]);
        close(p[1]);
    }
    {
        unsigned char rd[2];
        int bad[2] = {4000, 4001};

        CHECK(rr_poll_many(bad, 2, 0, rd) == -EBADF, "poll_many closed fds");
    }
    CHECK(rr_epoll_add(4000, 0, 1) == -EBADF, "epoll_add bad epfd");
    CHECK(rr_epoll_del(4000, 0) == -EBADF, "epoll_del bad epfd");
    CHECK(rr_epoll_drain(4000, 0, ev, 2) == -EBADF, "drain bad epfd");
    ep = rr_epoll_create();
    CHECK(rr_epoll_drain(ep, 0, ev, 0) == -EINVAL, "drain cap 0");
    CHECK(rr_epoll_drain(ep, 0, NULL, 2) == -EINVAL, "drain NULL");
    CHECK(rr_epoll_add(ep, -1, 1) == -EBADF, "epoll_add -1");
    CHECK(rr_epoll_add(ep, 4000, 1) == -EBADF, "epoll_add closed fd");

    c = spawn_pause(&fds[0]);
    fds[1] = 4000;
    fds[2] = -1;
    CHECK(rr_epoll_del(ep, fds[0]) == -ENOENT, "epoll_del absent fd");
    CHECK(rr_epoll_add(ep, fds[0], 1ULL << 32) == -EOVERFLOW, "token > 32 bits");
    CHECK(rr_epoll_add(ep, fds[0], 0xFFFFFFFFULL) == 0, "token = 2^32-1");
    CHECK(rr_pidfd_send_signal_many(fds, -1, 0, errs) == -EINVAL, "send_many n<0");
    CHECK(rr_pidfd_send_signal_many(NULL, 0, 0, NULL) == 0, "send_many empty");
    if (pidfd_syscalls) {
        r = rr_pidfd_send_signal_many(fds, 3, 0, errs);
        CHECK(r == 1 && errs[0] == 0 && errs[1] == -EBADF && errs[2] == -EBADF,
              "send_signal_many -> %d [%d %d %d]", r, errs[0], errs[1], errs[2]);
        CHECK(rr_pidfd_send_signal(fds[0], 12345) == -EINVAL, "bad signal number");
        r = rr_pidfd_send_signal_many(fds, 1, SIGKILL, NULL);
        CHECK(r == 1, "send_many SIGKILL -> %d", r);
    } else {
        SKIP("pidfd_send_signal_many");
        kill(c, SIGKILL);
    }
    memset(ev, 0, sizeof ev);
    r = rr_epoll_drain(ep, 10000000LL, ev, 2);
    CHECK(r == 1 && ev[0].token == 0xFFFFFFFFULL && ev[0].status == SIGKILL,
          "drain killed -> %d token %llu status %#x", r, ev[0].token, ev[0].status);
    close(fds[0]);
    close(ep);
    reap_all();
}

int main(void)
{
    detect_environment();
    test_subreaper();
    test_exit_status_decoding();
    test_drain_reaped_elsewhere();
    test_non_child();
    test_poll_many();
    test_epoll_drain();
    test_timeouts_in_microseconds();
    test_timeouts_without_pwait2();
    test_proc_stat();
    test_descendants();
    test_session();
    test_bad_inputs();
    reap_all();
    if (skipped)
        printf("%d checks skipped (each said why above)\n", skipped);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
