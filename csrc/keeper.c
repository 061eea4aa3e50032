/*
 * ralph-reaper-keeper: a small per-dispatch supervisor (design.md section 5).
 *
 *   ralph-reaper-keeper [--report-fd N] [--control-fd N] [--exit-file PATH]
 *                       [--grace-ms N] [--timeout-ms N]
 *                       [--die-with-parent --parent-pid P]
 *                       [--foreground] [--quiet] -- CMD [ARG...]
 *
 * --foreground: CMD is not given a new session; it stays in the keeper's
 * session and process group (which the host keeps in the terminal's
 * foreground), so it can read the controlling terminal.  --quiet: a failed
 * exec is only reported (exec_errno), not also told on stderr.
 *
 * Options also take the "--opt=value" form.  Anything else (unknown option,
 * bad number, fd 0-2 or a closed fd, no CMD, an --exit-file whose directory
 * is not writable, --die-with-parent without --parent-pid or the other way
 * round) is bad usage: one message on stderr, exit 125, nothing started.
 *
 * What it does
 *   - Becomes a child subreaper, so every orphan of the command's tree is
 *     reparented to it and reaped by it (wait4(-1, WNOHANG) on SIGCHLD).
 *   - Blocks SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT and the parent-death
 *     signal and reads them through a signalfd; the main loop is poll(2) on
 *     the signalfd and the control fd, with timeouts from CLOCK_MONOTONIC
 *     deadlines.  SIGPIPE is kept blocked too (report writes then fail with
 *     EPIPE, which is ignored).
 *   - Starts CMD (PATH searched as execvp does, but a file without a #! line
 *     is an exec failure, ENOEXEC, not run by /bin/sh) in a new session; the child
 *     gets the signal mask and SIGCHLD disposition the keeper started with,
 *     and SIGPIPE reset to SIG_DFL.  The child is cloned with CLONE_VM |
 *     CLONE_VFORK (fork when no stack can be had for it); from then to the
 *     exec it makes system calls only; an exec failure travels back as errno
 *     through a close-on-exec pipe.
 *   - Stop sequence (on SIGTERM/SIGINT/SIGHUP/SIGQUIT with --grace-ms, the
 *     first stage sending the signal received instead of SIGTERM;
 *     default 5000; on control "stop <ms>" or "kill" (grace 0); on parent
 *     death with min(grace, 500); when the command has exited on its own and
 *     descendants remain, with --grace-ms): discover every descendant
 *     (rr_list_descendants from the keeper), pin each with a pidfd, check it
 *     is still a live member of the tree (its parent is the keeper or a
 *     pinned member, it is no zombie, and the pidfd still names a live
 *     process after that check, so a recycled pid is never signalled), send
 *     SIGTERM then SIGCONT through the pidfds, parents before children (a
 *     parent must not see its children die before it got the signal itself);
 *     at the grace deadline discover again and SIGKILL
 *     everything, and go on discovering and SIGKILLing every 10 ms until no
 *     child is left.  2000 ms after the first SIGKILL it gives up (a process
 *     stuck in uninterruptible sleep): method "failed".  A later stop request
 *     can only shorten the grace.  With grace 0 no SIGTERM is sent.  When
 *     no pidfd can be had (kernel < 5.3, or out of fds) a member is pinned
 *     with its start time and signalled with kill(2) only while its pid
 *     still has that start time (checked before every signal), so a member
 *     reaped by its own parent is never confused with a process that got
 *     its pid later.
 *   - Exits only once wait4 reports ECHILD (or it gave up).  Being a
 *     subreaper, no child left means no descendant left.
 *
 * Parent death (--die-with-parent --parent-pid P)
 *   The parent-death signal is SIGRTMIN+2 (36 with glibc), set with
 *   PR_SET_PDEATHSIG.  If getppid() != P right after, the parent is already
 *   gone: nothing is started, the final report has method "not_started",
 *   reason and error "parent_died", and the keeper exits 125.  When the
 *   signal arrives later and getppid() still equals P, only the thread that
 *   spawned us exited: the signal is re-armed.  Otherwise, and on EOF of the
 *   control fd, the tree is stopped with min(grace, 500 ms).  Without
 *   --die-with-parent, EOF on the control fd just stops reading it.
 *
 * Control fd: lines "stop <grace_ms>\n" ("stop\n": the --grace-ms value),
 * "stop <grace_ms> <signo>\n" (the stop begins with that signal, as when the
 * keeper itself receives SIGINT, SIGHUP or SIGQUIT; SIGKILL means no grace)
 * and "kill\n".  Other lines are ignored.
 *
 * Report (--report-fd): one JSON object per line.
 *   {"event":"started","pid":P}        once the exec succeeded
 *   {"event":"command_exit","pid":P,"status":S,"exit_code":C|null,
 *    "signal":N|null}                   as soon as the command is reaped,
 *                                       before any survivor is stopped
 *   {"event":"exit", ...}                last, and also the whole content
 *                                       of --exit-file (written atomically)
 * The "exit" object has exactly these keys:
 *   pid                 command pid, null when it was never started
 *   status              raw wait status (waitpid encoding) of the command,
 *                       null when unknown (never started, or given up before
 *                       it could be reaped).  For an exec failure: code << 8
 *                       with code 127 (ENOENT, ENOTDIR) or 126 (otherwise).
 *   exit_code           0-255 for a normal exit, else null
 *   signal              the killing signal, else null
 *   core_dumped         true when the command dumped core
 *   utime_s, stime_s    command CPU seconds (rusage from wait4)
 *   maxrss_kb           command peak RSS, KiB
 *   descendants_killed  distinct live processes other than the command that
 *                       were signalled by a stop sequence (zombies are not
 *                       signalled and not counted)
 *   method              "natural": the command ended without a signal from us;
 *                       "sigterm": after our SIGTERM; "sigkill": killed by our
 *                       SIGKILL; "failed": we gave up with something alive;
 *                       "not_started"
 *   reason              what ended the run: "exit" (the command ended on its
 *                       own, nothing left), "leftovers" (it ended on its own
 *                       and survivors were stopped), "signal" (the keeper got
 *                       SIGTERM/INT/HUP/QUIT), "control", "parent_died",
 *                       "timeout" (--timeout-ms passed since the start),
 *                       "error" (could not start).  The first cause wins.
 *   stage_ms            {"sigterm": ms from SIGTERM until everything was gone
 *                       or SIGKILL was sent, "sigkill": ms from SIGKILL until
 *                       everything was gone (or the give-up)}; null for a
 *                       stage that did not happen
 *   survivors           after a give-up ("failed"): pids still alive (the
 *                       first MAX_SURVIVORS_SHOWN); else []
 *   exec_errno          errno of the failed exec, else 0
 *   error               null, or why the command was not started:
 *                       "parent_died", "pipe", "fork"
 *   errno               errno that goes with error, else 0
 *
 * Exit status: the command's.  exit(code) for a normal exit; for death by
 * signal N: core dumps off (RLIMIT_CORE 0 and not dumpable), N reset to
 * SIG_DFL and unblocked, raise(N) (exit(128 + N) if still alive), so that
 * waitpid on the keeper reports what the command did (without the core
 * flag).  125: bad usage, the command was not started, or the keeper gave up
 * before the command could be reaped.
 *
 * C rules: gnu99, -Wall -Wextra -Werror clean; anything newer than glibc 2.17
 * goes through reaper.c's syscall() wrappers (or syscall() here).
 */

#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "reaper.h"

#ifndef __WALL
#define __WALL 0x40000000
#endif
#ifndef PR_SET_PDEATHSIG
#define PR_SET_PDEATHSIG 1
#endif
#ifndef PR_SET_DUMPABLE
#define PR_SET_DUMPABLE 4
#endif

#define PROG "ralph-reaper-keeper"
#define EXIT_USAGE 125
#define DEFAULT_GRACE_MS 5000
/* The longest grace or timeout: about 31.7 years, far from overflowing a
   monotonic deadline in int64 nanoseconds.  The host passes longer finite
   durations as this one. */
#define MAX_MS 1000000000000LL
#define PDEATH_GRACE_MS 500
#define GIVE_UP_MS 2000
/* Pids listed in a give-up report: enough to act on, small enough for one line. */
#define MAX_SURVIVORS_SHOWN 32
#define KILL_RESCAN_MS 10
#define NS_PER_MS 1000000LL
#define NS_PER_S 1000000000LL
#define CTL_LINE_MAX 256

enum phase { PH_RUNNING, PH_TERM, PH_KILL };
enum reason { RS_EXIT, RS_SIGNAL, RS_CONTROL, RS_PARENT_DIED, RS_LEFTOVERS, RS_ERROR, RS_TIMEOUT };

static const char *const reason_names[] = {"exit",      "signal", "control", "parent_died",
                                           "leftovers", "error",  "timeout"};

/* One pinned member of the tree. */
struct pin {
    int pid;
    int fd; /* pidfd, or -1 when none could be opened (old kernel, EMFILE) */
    /* Start time (/proc stat field 22) when pinned: without a pidfd it is
       what tells the member from a process that got its pid later. */
    unsigned long long start;
};

/* Pinned members in discovery order (breadth first: parents before their
   children, so signals reach a parent before it can react to its children
   dying), with a hash index by pid. */
struct pintab {
    struct pin *v;
    size_t n, vcap;
    size_t *slots; /* index + 1 into v; 0 is empty */
    size_t hcap;   /* 0 or a power of two, at least 2 * n */
};

/* How to exec CMD, prepared before fork so the child only calls execve. */
struct exec_plan {
    char **paths;   /* candidate files, NULL terminated */
    char **argv;
    char **envp;
    int empty; /* CMD is "": ENOENT, as execvp */
};

struct keeper {
    /* options */
    int report_fd, control_fd;
    const char *exit_file;
    long long grace_ms;
    long long timeout_ms; /* 0: none; else stop the tree this long after the start */
    int die_with_parent, parent_pid;
    int foreground; /* --foreground: CMD stays in our session and process group */
    int quiet;      /* --quiet: no message of our own for a failed exec */
    int first_sig;  /* first signal of the stop: SIGTERM, or the INT/HUP/QUIT we got */
    char **cmd;

    /* set up */
    int me, sigfd, pdeath_sig;
    sigset_t orig_mask;
    struct sigaction orig_chld, dfl;

    /* the command */
    int cmd_pid, cmd_reaped, cmd_status, exec_errno, cmd_exit_sent;
    struct rusage cmd_ru;
    int children; /* 1 while wait4 says children remain */

    /* stop sequence */
    enum phase phase;
    enum reason reason;
    int reason_set, gave_up;
    int term_sent, kill_sent;         /* the stages happened */
    int term_to_cmd, kill_to_cmd;     /* ... and reached the live command */
    int64_t t_term, t_kill, t_done;   /* CLOCK_MONOTONIC ns */
    int64_t term_deadline, giveup_deadline, next_scan;
    int64_t run_deadline; /* --timeout-ms: 0 for none */
    long descendants_killed;
    struct pintab pins;
    int *desc;
    size_t desc_cap;

    /* control fd line buffer */
    char ctl[CTL_LINE_MAX];
    size_t ctl_len;
    int ctl_discard;
};

/* ---- small helpers ------------------------------------------------------- */

static void msg(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    int n;
    size_t len;
    const char *p = buf;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    len = (size_t)n < sizeof buf - 1 ? (size_t)n : sizeof buf - 2;
    buf[len++] = '\n';
    while (len > 0) {
        ssize_t w = write(2, p, len);

        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        len -= (size_t)w;
    }
}

static int64_t mono_ns(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
        return 0;
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Strict decimal in [lo, hi]: 0, or -1 for anything else. */
static int parse_num(const char *s, long long lo, long long hi, long long *out)
{
    long long v = 0;

    if (!s || !*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (*s - '0');
        if (v > hi)
            return -1;
    }
    if (v < lo)
        return -1;
    *out = v;
    return 0;
}

/* Write everything; EINTR retried, a full non-blocking fd waited for a while.
   0 or -errno (EPIPE included: the caller just stops writing there). */
static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);

        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd pf;

                pf.fd = fd;
                pf.events = POLLOUT;
                pf.revents = 0;
                if (poll(&pf, 1, 1000) > 0)
                    continue;
                return -EAGAIN;
            }
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* fcntl without fcntl(): newer glibc headers may redirect it to fcntl64. */
static int fd_is_open(int fd)
{
    return syscall(SYS_fcntl, fd, F_GETFD) >= 0;
}

static int set_cloexec(int fd)
{
    return ioctl(fd, FIOCLEX) < 0 ? -errno : 0;
}

/* ---- pin table ----------------------------------------------------------- */

static size_t pin_hash(int pid, size_t mask)
{
    return (size_t)((uint32_t)pid * 2654435761u) & mask;
}

/* Index of pid in t->v, or -1. */
static long pin_find(const struct pintab *t, int pid)
{
    size_t mask, i;

    if (t->hcap == 0)
        return -1;
    mask = t->hcap - 1;
    for (i = pin_hash(pid, mask);; i = (i + 1) & mask) {
        size_t s = t->slots[i];

        if (s == 0)
            return -1;
        if (t->v[s - 1].pid == pid)
            return (long)(s - 1);
    }
}

static void pin_index(struct pintab *t, size_t k)
{
    size_t mask = t->hcap - 1, i = pin_hash(t->v[k].pid, mask);

    while (t->slots[i] != 0)
        i = (i + 1) & mask;
    t->slots[i] = k + 1;
}

static void pin_reindex(struct pintab *t)
{
    size_t k;

    if (t->hcap == 0)
        return;
    memset(t->slots, 0, t->hcap * sizeof *t->slots);
    for (k = 0; k < t->n; k++)
        pin_index(t, k);
}

/* Append a pid known not to be present: 0 or -ENOMEM. */
static int pin_add(struct pintab *t, int pid, int fd, unsigned long long start)
{
    if (t->n == t->vcap) {
        size_t ncap = t->vcap ? t->vcap * 2 : 64;
        struct pin *nv = realloc(t->v, ncap * sizeof *nv);

        if (!nv)
            return -ENOMEM;
        t->v = nv;
        t->vcap = ncap;
    }
    if ((t->n + 1) * 2 > t->hcap) {
        size_t ncap = 128;
        size_t *ns;

        while (ncap < (t->n + 1) * 4)
            ncap *= 2;
        ns = calloc(ncap, sizeof *ns);
        if (!ns)
            return -ENOMEM;
        free(t->slots);
        t->slots = ns;
        t->hcap = ncap;
        pin_reindex(t);
    }
    t->v[t->n].pid = pid;
    t->v[t->n].fd = fd;
    t->v[t->n].start = start;
    pin_index(t, t->n++);
    return 0;
}

static void pin_free(struct pintab *t)
{
    size_t k;

    for (k = 0; k < t->n; k++)
        if (t->v[k].fd >= 0)
            close(t->v[k].fd);
    free(t->v);
    free(t->slots);
    memset(t, 0, sizeof *t);
}

/* Signal a pinned member: through its pidfd, or, without one, by pid only
   while that pid still has the start time it had when pinned (-ESRCH once it
   names another process: a member reaped by its own parent, pid recycled). */
static int pin_signal(const struct pin *p, int sig)
{
    struct rr_proc_stat st;
    int r;

    if (p->fd >= 0)
        return rr_pidfd_send_signal(p->fd, sig);
    r = rr_proc_stat(p->pid, &st);
    if (r == -ENOENT || r == -ESRCH || (r == 0 && st.starttime != p->start))
        return -ESRCH;
    if (r < 0)
        return r; /* cannot tell (out of fds?): not signalled, tried again later */
    return kill(p->pid, sig) < 0 ? -errno : 0;
}

/* ---- reporting ----------------------------------------------------------- */

struct jbuf {
    char b[2048];
    size_t n;
    int overflow;
};

static void jb_add(struct jbuf *j, const char *fmt, ...)
{
    va_list ap;
    int r;

    if (j->overflow)
        return;
    va_start(ap, fmt);
    r = vsnprintf(j->b + j->n, sizeof j->b - j->n, fmt, ap);
    va_end(ap);
    if (r < 0 || (size_t)r >= sizeof j->b - j->n) {
        j->overflow = 1;
        return;
    }
    j->n += (size_t)r;
}

static void jb_int_or_null(struct jbuf *j, const char *key, int have, long long v)
{
    if (have)
        jb_add(j, ",\"%s\":%lld", key, v);
    else
        jb_add(j, ",\"%s\":null", key);
}

static void report_line(struct keeper *k, const struct jbuf *j)
{
    char line[sizeof j->b + 1];
    int r;

    if (k->report_fd < 0 || j->overflow)
        return;
    memcpy(line, j->b, j->n);
    line[j->n] = '\n';
    r = write_all(k->report_fd, line, j->n + 1);
    if (r == -EPIPE || r == -EBADF) {
        /* Nobody reads any more: stop trying. */
        if (k->report_fd != k->control_fd)
            close(k->report_fd);
        k->report_fd = -1;
    }
}

static void status_fields(struct jbuf *j, int status)
{
    jb_int_or_null(j, "exit_code", WIFEXITED(status), WIFEXITED(status) ? WEXITSTATUS(status) : 0);
    jb_int_or_null(j, "signal", WIFSIGNALED(status), WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

static double ms_between(int64_t a, int64_t b)
{
    return (double)(b - a) / 1e6;
}

static const char *method_name(const struct keeper *k)
{
    if (k->cmd_pid <= 0)
        return "not_started";
    if (k->gave_up)
        return "failed";
    if (k->kill_to_cmd && WIFSIGNALED(k->cmd_status) && WTERMSIG(k->cmd_status) == SIGKILL)
        return "sigkill";
    if (k->term_to_cmd || k->kill_to_cmd)
        return "sigterm";
    return "natural";
}

static void build_final(const struct keeper *k, struct jbuf *j, const char *error, int err)
{
    int have = k->cmd_reaped;
    const struct rusage *ru = &k->cmd_ru;

    j->n = 0;
    j->overflow = 0;
    jb_add(j, "{\"event\":\"exit\"");
    jb_int_or_null(j, "pid", k->cmd_pid > 0, k->cmd_pid);
    jb_int_or_null(j, "status", have, k->cmd_status);
    if (have) {
        status_fields(j, k->cmd_status);
    } else {
        jb_add(j, ",\"exit_code\":null,\"signal\":null");
    }
    jb_add(j, ",\"core_dumped\":%s", have && WIFSIGNALED(k->cmd_status) && WCOREDUMP(k->cmd_status)
                                         ? "true" : "false");
    jb_add(j, ",\"utime_s\":%.6f,\"stime_s\":%.6f,\"maxrss_kb\":%ld",
           have ? (double)ru->ru_utime.tv_sec + (double)ru->ru_utime.tv_usec / 1e6 : 0.0,
           have ? (double)ru->ru_stime.tv_sec + (double)ru->ru_stime.tv_usec / 1e6 : 0.0,
           have ? ru->ru_maxrss : 0L);
    jb_add(j, ",\"descendants_killed\":%ld", k->descendants_killed);
    jb_add(j, ",\"method\":\"%s\"", method_name(k));
    jb_add(j, ",\"reason\":\"%s\"", reason_names[k->reason]);
    jb_add(j, ",\"stage_ms\":{\"sigterm\":");
    if (k->term_sent)
        jb_add(j, "%.3f", ms_between(k->t_term, k->kill_sent ? k->t_kill : k->t_done));
    else
        jb_add(j, "null");
    jb_add(j, ",\"sigkill\":");
    if (k->kill_sent)
        jb_add(j, "%.3f", ms_between(k->t_kill, k->t_done));
    else
        jb_add(j, "null");
    jb_add(j, "}");
    jb_add(j, ",\"survivors\":[");
    if (k->gave_up) {
        size_t s;
        int shown = 0;

        for (s = 0; s < k->pins.n && shown < MAX_SURVIVORS_SHOWN; s++)
            if (pin_signal(&k->pins.v[s], 0) == 0)
                jb_add(j, "%s%d", shown++ ? "," : "", k->pins.v[s].pid);
    }
    jb_add(j, "]");
    jb_add(j, ",\"exec_errno\":%d", k->exec_errno);
    if (error)
        jb_add(j, ",\"error\":\"%s\",\"errno\":%d}", error, err);
    else
        jb_add(j, ",\"error\":null,\"errno\":0}");
}

/* Directory part of path ("." when there is none). Caller frees. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    size_t n;
    char *d;

    if (!slash)
        return strdup(".");
    n = slash == path ? 1 : (size_t)(slash - path);
    d = malloc(n + 1);
    if (!d)
        return NULL;
    memcpy(d, path, n);
    d[n] = '\0';
    return d;
}

/* Temp file in the same directory, written, fsynced, renamed over path, and
   the directory fsynced: readers see the old file, or the whole new one.
   The temp file's name is short and its own (not path's name plus a suffix,
   which NAME_MAX would refuse for a long but valid name). */
static int write_exit_file(const char *path, const char *data, size_t len)
{
    char *dir = dir_of(path), *tmp;
    size_t cap;
    int fd = -1, r = 0, attempt, dfd;

    if (!dir)
        return -ENOMEM;
    cap = strlen(dir) + 64;
    tmp = malloc(cap);
    if (!tmp) {
        free(dir);
        return -ENOMEM;
    }
    for (attempt = 0; attempt < 100; attempt++) {
        snprintf(tmp, cap, "%s/.rr-exit-%d-%d.tmp", dir, (int)getpid(), attempt);
        do {
            fd = open(tmp, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOCTTY, 0644);
        } while (fd < 0 && errno == EINTR);
        if (fd >= 0 || errno != EEXIST)
            break;
    }
    if (fd < 0) {
        r = -errno;
        goto out;
    }
    r = write_all(fd, data, len);
    if (r == 0 && fsync(fd) < 0)
        r = -errno;
    if (close(fd) < 0 && r == 0 && errno != EINTR)
        r = -errno;
    if (r == 0 && rename(tmp, path) < 0)
        r = -errno;
    if (r < 0) {
        unlink(tmp);
        goto out;
    }
    do {
        dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } while (dfd < 0 && errno == EINTR);
    if (dfd >= 0) {
        if (fsync(dfd) < 0 && errno != EINVAL)
            r = -errno;
        close(dfd);
    }
out:
    free(dir);
    free(tmp);
    return r;
}

static void report_final(struct keeper *k, const char *error, int err)
{
    struct jbuf j;

    build_final(k, &j, error, err);
    if (j.overflow) {
        msg(PROG ": internal error: report too long");
        return;
    }
    if (k->exit_file) {
        char line[sizeof j.b + 1];
        int r;

        memcpy(line, j.b, j.n);
        line[j.n] = '\n';
        r = write_exit_file(k->exit_file, line, j.n + 1);
        if (r < 0)
            msg(PROG ": cannot write exit file %s: %s", k->exit_file, strerror(-r));
    }
    report_line(k, &j);
}

/* ---- the stop sequence --------------------------------------------------- */

/* Current descendants of the keeper into k->desc; returns how many. */
static int list_tree(struct keeper *k)
{
    for (;;) {
        int n = rr_list_descendants(&k->me, 1, k->desc, (int)k->desc_cap);
        size_t ncap;
        int *nd;

        if (n < 0)
            return 0;
        if ((size_t)n <= k->desc_cap)
            return n;
        ncap = (size_t)n + (size_t)n / 2 + 64;
        nd = realloc(k->desc, ncap * sizeof *nd);
        if (!nd)
            return (int)k->desc_cap; /* the first desc_cap entries are valid */
        k->desc = nd;
        k->desc_cap = ncap;
    }
}

/* Forget pins whose process is gone (reaped): their pid may come back. */
static void prune_pins(struct keeper *k)
{
    struct pintab *t = &k->pins;
    size_t i, j = 0;

    for (i = 0; i < t->n; i++) {
        if (pin_signal(&t->v[i], 0) == -ESRCH) {
            if (t->v[i].fd >= 0)
                close(t->v[i].fd);
        } else {
            t->v[j++] = t->v[i];
        }
    }
    if (j != t->n) {
        t->n = j;
        pin_reindex(t);
    }
}

static void note_signalled(struct keeper *k, int pid, int sig)
{
    if (pid != k->cmd_pid || k->cmd_reaped)
        return;
    if (sig == SIGKILL)
        k->kill_to_cmd = 1;
    else
        k->term_to_cmd = 1;
}

/* Pin pid if it is (still) a live member of the tree: its pidfd opened, its
   parent the keeper or a pinned member, not a zombie, and the pidfd still
   names a live process afterwards (so the stat read was about that one). */
static void pin_member(struct keeper *k, int pid, int sig)
{
    struct rr_proc_stat st;
    struct pin p;
    int fd = rr_pidfd_open(pid);

    if (fd < 0 && fd != -ENOSYS && fd != -EMFILE && fd != -ENFILE && fd != -ENOMEM)
        return; /* gone already */
    p.pid = pid;
    p.fd = fd < 0 ? -1 : fd;
    /* A zombie leader whose other threads still run has not exited. */
    if (rr_proc_stat(pid, &st) < 0 || ((st.state == 'Z' || st.state == 'X') && st.threads <= 1))
        goto drop;
    p.start = st.starttime;
    if (st.ppid != k->me && pin_find(&k->pins, st.ppid) < 0)
        goto drop;
    if (pin_signal(&p, 0) < 0)
        goto drop;
    if (pid != k->cmd_pid || k->cmd_reaped)
        k->descendants_killed++;
    if (pin_add(&k->pins, pid, p.fd, p.start) == 0)
        return;
    /* No memory to remember it: signal it now, at least. */
    pin_signal(&p, sig);
    if (sig != SIGKILL)
        pin_signal(&p, SIGCONT);
    note_signalled(k, pid, sig);
drop:
    if (p.fd >= 0)
        close(p.fd);
}

/* Discover and pin the tree, then send sig (and SIGCONT after SIGTERM) to
   every pinned member through its pidfd. */
static void discover_and_signal(struct keeper *k, int sig)
{
    int n, i;
    size_t s;

    prune_pins(k);
    n = list_tree(k);
    for (i = 0; i < n; i++)
        if (pin_find(&k->pins, k->desc[i]) < 0)
            pin_member(k, k->desc[i], sig);
    for (s = 0; s < k->pins.n; s++)
        if (pin_signal(&k->pins.v[s], sig) == 0)
            note_signalled(k, k->pins.v[s].pid, sig);
    if (sig != SIGKILL)
        for (s = 0; s < k->pins.n; s++)
            pin_signal(&k->pins.v[s], SIGCONT);
}

static void enter_kill(struct keeper *k, int64_t now)
{
    k->phase = PH_KILL;
    k->kill_sent = 1;
    k->t_kill = now;
    k->giveup_deadline = now + GIVE_UP_MS * NS_PER_MS;
    discover_and_signal(k, SIGKILL);
    k->next_scan = mono_ns() + KILL_RESCAN_MS * NS_PER_MS;
}

static void request_stop(struct keeper *k, long long grace_ms, enum reason why)
{
    int64_t now = mono_ns(), deadline = now + (int64_t)grace_ms * NS_PER_MS;

    if (!k->reason_set) {
        k->reason = why;
        k->reason_set = 1;
    }
    if (k->phase == PH_RUNNING) {
        if (grace_ms <= 0) {
            enter_kill(k, now);
            return;
        }
        k->phase = PH_TERM;
        k->term_sent = 1;
        k->t_term = now;
        k->term_deadline = deadline;
        discover_and_signal(k, k->first_sig ? k->first_sig : SIGTERM);
    } else if (k->phase == PH_TERM && deadline < k->term_deadline) {
        k->term_deadline = deadline;
    }
}

static long long parent_grace(const struct keeper *k)
{
    return k->grace_ms < PDEATH_GRACE_MS ? k->grace_ms : PDEATH_GRACE_MS;
}

/* ---- events -------------------------------------------------------------- */

static int exec_exit_code(int err)
{
    return (err == ENOENT || err == ENOTDIR) ? 127 : 126;
}

/* Reap every child that has exited; k->children says whether any remain. */
static void reap(struct keeper *k)
{
    for (;;) {
        struct rusage ru;
        int st = 0;
        pid_t p;

        memset(&ru, 0, sizeof ru);
        p = wait4(-1, &st, WNOHANG | __WALL, &ru);
        if (p > 0) {
            if (p == k->cmd_pid && !k->cmd_reaped) {
                k->cmd_reaped = 1;
                k->cmd_status = k->exec_errno ? exec_exit_code(k->exec_errno) << 8 : st;
                k->cmd_ru = ru;
            }
            continue;
        }
        if (p == 0) {
            k->children = 1;
            return;
        }
        if (errno == EINTR)
            continue;
        k->children = errno == ECHILD ? 0 : 1;
        return;
    }
}

static void send_command_exit(struct keeper *k)
{
    struct jbuf j;

    k->cmd_exit_sent = 1;
    memset(&j, 0, sizeof j);
    jb_add(&j, "{\"event\":\"command_exit\",\"pid\":%d,\"status\":%d", k->cmd_pid, k->cmd_status);
    status_fields(&j, k->cmd_status);
    jb_add(&j, "}");
    report_line(k, &j);
}

static void parent_check(struct keeper *k)
{
    if (!k->die_with_parent)
        return;
    if (getppid() == k->parent_pid) {
        /* Only the thread that forked us exited: watch the new parent thread. */
        if (prctl(PR_SET_PDEATHSIG, (unsigned long)k->pdeath_sig, 0UL, 0UL, 0UL) < 0)
            msg(PROG ": prctl(PR_SET_PDEATHSIG): %s", strerror(errno));
        if (getppid() == k->parent_pid)
            return;
    }
    request_stop(k, parent_grace(k), RS_PARENT_DIED);
}

static void handle_signals(struct keeper *k)
{
    for (;;) {
        struct signalfd_siginfo si;
        ssize_t n = read(k->sigfd, &si, sizeof si);

        if (n < 0 && errno == EINTR)
            continue;
        if (n != (ssize_t)sizeof si)
            return; /* EAGAIN: drained */
        if ((int)si.ssi_signo == k->pdeath_sig) {
            parent_check(k);
            continue;
        }
        switch (si.ssi_signo) {
        case SIGTERM:
        case SIGINT:
        case SIGHUP:
        case SIGQUIT:
            /* As timeout(1): the stop begins with the signal received. */
            if (k->phase == PH_RUNNING && !k->first_sig)
                k->first_sig = (int)si.ssi_signo;
            request_stop(k, k->grace_ms, RS_SIGNAL);
            break;
        default: /* SIGCHLD: reaped at the top of the loop */
            break;
        }
    }
}

static void control_line(struct keeper *k, char *line)
{
    size_t n = strlen(line);
    long long grace;

    while (n > 0 && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t'))
        line[--n] = '\0';
    if (strcmp(line, "kill") == 0) {
        request_stop(k, 0, RS_CONTROL);
    } else if (strcmp(line, "stop") == 0) {
        request_stop(k, k->grace_ms, RS_CONTROL);
    } else if (strncmp(line, "stop ", 5) == 0) {
        char *arg = line + 5, *sig_arg;
        long long sig = 0;

        while (*arg == ' ')
            arg++;
        sig_arg = strchr(arg, ' ');
        if (sig_arg) {
            *sig_arg++ = '\0';
            while (*sig_arg == ' ')
                sig_arg++;
            if (parse_num(sig_arg, 1, NSIG - 1, &sig) != 0)
                return;
        }
        if (parse_num(arg, 0, MAX_MS, &grace) != 0)
            return;
        if (sig == SIGKILL)
            grace = 0;
        else if (sig && k->phase == PH_RUNNING && !k->first_sig)
            k->first_sig = (int)sig;
        request_stop(k, grace, RS_CONTROL);
    }
    /* anything else: ignored */
}

static void control_eof(struct keeper *k)
{
    if (k->ctl_len > 0 && !k->ctl_discard) { /* a last line without '\n' */
        k->ctl[k->ctl_len] = '\0';
        control_line(k, k->ctl);
    }
    k->ctl_len = 0;
    if (k->control_fd != k->report_fd) /* one socket may serve both */
        close(k->control_fd);
    k->control_fd = -1;
    if (k->die_with_parent)
        request_stop(k, parent_grace(k), RS_PARENT_DIED);
}

static void handle_control(struct keeper *k)
{
    char buf[512];
    ssize_t n, i;

    do {
        n = read(k->control_fd, buf, sizeof buf);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        n = 0; /* unreadable: as good as closed */
    }
    if (n == 0) {
        control_eof(k);
        return;
    }
    for (i = 0; i < n; i++) {
        char c = buf[i];

        if (c == '\n') {
            if (!k->ctl_discard) {
                k->ctl[k->ctl_len] = '\0';
                control_line(k, k->ctl);
            }
            k->ctl_len = 0;
            k->ctl_discard = 0;
        } else if (k->ctl_len + 1 < sizeof k->ctl) {
            k->ctl[k->ctl_len++] = c;
        } else {
            k->ctl_discard = 1; /* too long: not a command */
        }
    }
}

/* How long the main loop may wait from now, in nanoseconds (-1: until something
   happens).  The kernel lets a poll of t end up to t/1000 late (its slack), so
   the loop asks for t*1000/1001 and then for what is left: a stage's SIGKILL
   leaves at its deadline, not up to a millisecond and a thousandth later. */
static int64_t poll_timeout_ns(const struct keeper *k, int64_t now)
{
    int64_t until;

    if (k->phase == PH_TERM)
        until = k->term_deadline;
    else if (k->phase == PH_KILL)
        until = k->next_scan < k->giveup_deadline ? k->next_scan : k->giveup_deadline;
    else if (k->run_deadline && !k->cmd_reaped)
        until = k->run_deadline;
    else
        return -1;
    if (until <= now)
        return 0;
    return (until - now) - (until - now) / 1001;
}

static void main_loop(struct keeper *k)
{
    for (;;) {
        struct pollfd pf[2];
        struct timespec ts;
        int64_t now, wait_ns;
        int nfds = 1, r;

        reap(k);
        if (k->cmd_reaped && !k->cmd_exit_sent)
            send_command_exit(k);
        now = mono_ns();
        if (!k->children) {
            k->t_done = now;
            return;
        }
        if (k->cmd_reaped && k->phase == PH_RUNNING)
            request_stop(k, k->grace_ms, RS_LEFTOVERS);
        if (k->phase == PH_RUNNING && k->run_deadline && now >= k->run_deadline)
            request_stop(k, k->grace_ms, RS_TIMEOUT);
        if (k->phase == PH_TERM && now >= k->term_deadline)
            enter_kill(k, now);
        if (k->phase == PH_KILL) {
            if (now >= k->giveup_deadline) {
                k->gave_up = 1;
                k->t_done = now;
                return;
            }
            if (now >= k->next_scan) {
                discover_and_signal(k, SIGKILL);
                k->next_scan = mono_ns() + KILL_RESCAN_MS * NS_PER_MS;
            }
        }

        pf[0].fd = k->sigfd;
        pf[0].events = POLLIN;
        pf[0].revents = 0;
        if (k->control_fd >= 0) {
            pf[1].fd = k->control_fd;
            pf[1].events = POLLIN;
            pf[1].revents = 0;
            nfds = 2;
        }
        wait_ns = poll_timeout_ns(k, mono_ns());
        if (wait_ns >= 0) {
            ts.tv_sec = (time_t)(wait_ns / NS_PER_S);
            ts.tv_nsec = (long)(wait_ns % NS_PER_S);
        }
        r = ppoll(pf, (nfds_t)nfds, wait_ns >= 0 ? &ts : NULL, NULL);
        if (r < 0) {
            if (errno != EINTR) {
                /* ENOMEM and the like: do not spin, try again shortly. */
                struct timespec ts = {0, 10 * NS_PER_MS};

                nanosleep(&ts, NULL);
            }
            continue;
        }
        if (pf[0].revents)
            handle_signals(k);
        if (nfds == 2 && pf[1].revents) {
            if (pf[1].revents & POLLNVAL) {
                k->control_fd = -1; /* closed under us: nothing to read */
                if (k->die_with_parent)
                    request_stop(k, parent_grace(k), RS_PARENT_DIED);
            } else {
                handle_control(k);
            }
        }
    }
}

/* ---- starting the command ------------------------------------------------ */

static void plan_free(struct exec_plan *pl)
{
    size_t i;

    if (pl->paths) {
        for (i = 0; pl->paths[i]; i++)
            free(pl->paths[i]);
        free(pl->paths);
    }
    memset(pl, 0, sizeof *pl);
}

/* The candidate files execvp would try, in order. 0 or -ENOMEM. */
static int plan_build(struct exec_plan *pl, char **argv)
{
    extern char **environ;
    const char *file = argv[0], *path, *p;
    size_t flen = strlen(file), n = 0, i;

    memset(pl, 0, sizeof *pl);
    pl->argv = argv;
    pl->envp = environ;
    if (flen == 0) {
        pl->empty = 1;
        pl->paths = calloc(1, sizeof *pl->paths);
        return pl->paths ? 0 : -ENOMEM;
    }
    if (strchr(file, '/')) {
        pl->paths = calloc(2, sizeof *pl->paths);
        if (!pl->paths || !(pl->paths[0] = strdup(file)))
            return -ENOMEM;
        return 0;
    }
    path = getenv("PATH");
    if (!path)
        path = "/bin:/usr/bin"; /* glibc's default for execvp */
    for (p = path, n = 1; *p; p++)
        n += *p == ':';
    pl->paths = calloc(n + 1, sizeof *pl->paths);
    if (!pl->paths)
        return -ENOMEM;
    for (p = path, i = 0; i < n; i++) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p), off = dlen;
        char *c = malloc(dlen + 1 + flen + 1);

        if (!c)
            return -ENOMEM;
        memcpy(c, p, dlen);
        if (dlen) /* an empty element means the current directory */
            c[off++] = '/';
        memcpy(c + off, file, flen + 1);
        pl->paths[i] = c;
        p = end ? end + 1 : p + dlen;
    }
    return 0;
}

/* In the child: only async-signal-safe calls from here to execve/_exit. */
static void child_exec(const struct keeper *k, struct exec_plan *pl, int errfd)
{
    int err = ENOENT, got_eacces = 0, i;
    ssize_t w;

    if (!k->foreground && setsid() < 0) {
        err = errno;
        goto fail;
    }
    sigaction(SIGCHLD, &k->orig_chld, NULL);
    sigaction(SIGPIPE, &k->dfl, NULL);
    sigprocmask(SIG_SETMASK, &k->orig_mask, NULL);
    if (pl->empty)
        goto fail;
    for (i = 0; pl->paths[i]; i++) {
        execve(pl->paths[i], pl->argv, pl->envp);
        err = errno;
        /* ENOEXEC (no #! line, not a binary) is an error, not a cue to run
           the file with /bin/sh as execvp does: every backend starts a
           command the same way, and subprocess reports ENOEXEC. */
        if (err == EACCES) {
            got_eacces = 1;
            continue;
        }
        if (err == ENOENT || err == ESTALE || err == ENOTDIR || err == ENODEV || err == ETIMEDOUT)
            continue;
        break;
    }
    if (!pl->paths[i] && got_eacces)
        err = EACCES;
fail:
    do {
        w = write(errfd, &err, sizeof err);
    } while (w < 0 && errno == EINTR);
    _exit(127);
}

struct child_args {
    const struct keeper *k;
    struct exec_plan *pl;
    int errfd;
};

static int child_main(void *arg)
{
    const struct child_args *a = arg;

    child_exec(a->k, a->pl, a->errfd);
    return 127; /* not reached: child_exec ends in execve or _exit */
}

/* The child's stack while it shares our memory (it only makes system calls). */
#define CHILD_STACK_SIZE (64 * 1024)

/* AddressSanitizer cannot follow a process onto a stack of its own making. */
#if defined(__SANITIZE_ADDRESS__)
#define RR_FORK_ONLY 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RR_FORK_ONLY 1
#endif
#endif
#ifndef RR_FORK_ONLY
#define RR_FORK_ONLY 0
#endif

/* Start child_exec in a new process: clone(CLONE_VM | CLONE_VFORK) where it can
   (no copy of our page tables, and we resume once the exec is done: both are
   on the path from spawn to the "started" report), else (no stack, or an
   AddressSanitizer build) fork.  The child
   shares our memory until execve, so it must only make system calls; no
   signal handler can run in it, since the keeper installs none (every
   disposition is SIG_DFL or SIG_IGN).  pid, or -1 with errno set. */
static pid_t spawn_child(const struct keeper *k, struct exec_plan *pl, int errfd)
{
    struct child_args args;
    void *stack;
    pid_t pid;
    int err;

    stack = RR_FORK_ONLY ? MAP_FAILED
                         : mmap(NULL, CHILD_STACK_SIZE, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) {
        pid = fork();
        if (pid == 0)
            child_exec(k, pl, errfd);
        return pid;
    }
    args.k = k;
    args.pl = pl;
    args.errfd = errfd;
    /* The stack grows down on every architecture the package builds for. */
    pid = clone(child_main, (char *)stack + CHILD_STACK_SIZE, CLONE_VM | CLONE_VFORK | SIGCHLD,
                &args);
    err = errno;
    munmap(stack, CHILD_STACK_SIZE);
    errno = err;
    return pid;
}

/* Fork and exec the command: 0 (k->cmd_pid set, k->exec_errno set when the
   exec failed) or -errno with *what naming the failed step. */
static int start_command(struct keeper *k, const char **what)
{
    struct exec_plan pl;
    int pipefd[2], err = 0, r;
    size_t got = 0;
    pid_t pid;

    if (plan_build(&pl, k->cmd) < 0) {
        plan_free(&pl);
        *what = "fork";
        return -ENOMEM;
    }
    if (pipe2(pipefd, O_CLOEXEC) < 0) {
        r = -errno;
        plan_free(&pl);
        *what = "pipe";
        return r;
    }
    pid = spawn_child(k, &pl, pipefd[1]);
    if (pid < 0) {
        r = -errno;
        close(pipefd[0]);
        close(pipefd[1]);
        plan_free(&pl);
        *what = "fork";
        return r;
    }
    k->cmd_pid = pid;
    close(pipefd[1]);
    plan_free(&pl);
    /* EOF: the exec succeeded (the write end was close-on-exec). */
    while (got < sizeof err) {
        ssize_t n = read(pipefd[0], (char *)&err + got, sizeof err - got);

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(pipefd[0]);
    if (got == sizeof err)
        k->exec_errno = err > 0 ? err : EIO;
    return 0;
}

/* ---- exit ---------------------------------------------------------------- */

static int kills_by_default(int sig)
{
    switch (sig) {
    case SIGCHLD:
    case SIGCONT:
    case SIGURG:
    case SIGWINCH:
    case SIGSTOP:
    case SIGTSTP:
    case SIGTTIN:
    case SIGTTOU:
        return 0;
    default:
        return sig > 0 && sig < NSIG;
    }
}

/* Leave with the command's wait status. */
static void mirror_exit(int status)
{
    if (WIFEXITED(status))
        exit(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        struct rlimit rl;
        struct sigaction sa;
        sigset_t set;

        rl.rlim_cur = rl.rlim_max = 0;
        setrlimit(RLIMIT_CORE, &rl);
        prctl(PR_SET_DUMPABLE, 0UL, 0UL, 0UL, 0UL); /* a piped core_pattern ignores RLIMIT_CORE */
        if (kills_by_default(sig)) {
            memset(&sa, 0, sizeof sa);
            sa.sa_handler = SIG_DFL;
            sigemptyset(&sa.sa_mask);
            sigaction(sig, &sa, NULL);
            sigemptyset(&set);
            sigaddset(&set, sig);
            sigprocmask(SIG_UNBLOCK, &set, NULL);
            raise(sig);
        }
        exit(128 + sig);
    }
    exit(EXIT_USAGE);
}

static void keeper_free(struct keeper *k)
{
    pin_free(&k->pins);
    free(k->desc);
    k->desc = NULL;
    if (k->sigfd >= 0)
        close(k->sigfd);
    if (k->report_fd >= 0)
        close(k->report_fd);
    if (k->control_fd >= 0 && k->control_fd != k->report_fd)
        close(k->control_fd);
    k->sigfd = k->report_fd = k->control_fd = -1;
}

/* ---- command line -------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f, "usage: " PROG " [--report-fd N] [--control-fd N] [--exit-file PATH]\n"
               "       [--grace-ms N] [--timeout-ms N] [--die-with-parent --parent-pid P]\n"
               "       [--foreground] [--quiet]\n"
               "       -- CMD [ARG...]\n");
}

static int bad_usage(const char *what, const char *arg)
{
    if (arg)
        msg(PROG ": %s: '%s'", what, arg);
    else
        msg(PROG ": %s", what);
    usage(stderr);
    return -1;
}

static int parse_fd_opt(const char *name, const char *v, int *out)
{
    long long n;

    if (parse_num(v, 0, INT_MAX, &n) < 0)
        return bad_usage("not a file descriptor number", v);
    if (n <= 2)
        return bad_usage("fds 0, 1 and 2 belong to the command", v);
    if (!fd_is_open((int)n)) {
        msg(PROG ": %s %lld is not an open file descriptor", name, n);
        return -1;
    }
    *out = (int)n;
    return 0;
}

static int parse_args(struct keeper *k, int argc, char **argv)
{
    int i, have_ppid = 0;

    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *eq, *val;
        char name[32];
        size_t nlen;
        long long n;

        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (strncmp(a, "--", 2) != 0)
            break; /* CMD without "--" */
        if (strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(0);
        }
        if (strcmp(a, "--foreground") == 0) {
            k->foreground = 1;
            continue;
        }
        if (strcmp(a, "--quiet") == 0) {
            k->quiet = 1;
            continue;
        }
        if (strcmp(a, "--die-with-parent") == 0) {
            k->die_with_parent = 1;
            continue;
        }
        eq = strchr(a, '=');
        nlen = eq ? (size_t)(eq - a) : strlen(a);
        if (nlen >= sizeof name)
            return bad_usage("unknown option", a);
        memcpy(name, a, nlen);
        name[nlen] = '\0';
        if (strcmp(name, "--report-fd") && strcmp(name, "--control-fd") &&
            strcmp(name, "--exit-file") && strcmp(name, "--grace-ms") &&
            strcmp(name, "--timeout-ms") && strcmp(name, "--parent-pid"))
            return bad_usage("unknown option", a);
        if (eq) {
            val = eq + 1;
        } else {
            if (i + 1 >= argc)
                return bad_usage("option needs a value", a);
            val = argv[++i];
        }
        if (strcmp(name, "--report-fd") == 0) {
            if (parse_fd_opt(name, val, &k->report_fd) < 0)
                return -1;
        } else if (strcmp(name, "--control-fd") == 0) {
            if (parse_fd_opt(name, val, &k->control_fd) < 0)
                return -1;
        } else if (strcmp(name, "--exit-file") == 0) {
            if (!*val)
                return bad_usage("empty --exit-file", NULL);
            k->exit_file = val;
        } else if (strcmp(name, "--grace-ms") == 0) {
            if (parse_num(val, 0, MAX_MS, &n) < 0)
                return bad_usage("--grace-ms wants milliseconds (0 to 1000000000000)", val);
            k->grace_ms = n;
        } else if (strcmp(name, "--timeout-ms") == 0) {
            if (parse_num(val, 0, MAX_MS, &n) < 0)
                return bad_usage("--timeout-ms wants milliseconds (0 to 1000000000000)", val);
            k->timeout_ms = n;
        } else {
            if (parse_num(val, 1, INT_MAX, &n) < 0)
                return bad_usage("--parent-pid wants a pid", val);
            k->parent_pid = (int)n;
            have_ppid = 1;
        }
    }
    if (i >= argc)
        return bad_usage("no command given", NULL);
    if (k->die_with_parent != have_ppid)
        return bad_usage("--die-with-parent and --parent-pid go together", NULL);
    if (k->exit_file) {
        char *dir = dir_of(k->exit_file);
        int ok = dir && access(dir, W_OK | X_OK) == 0;

        if (!ok)
            msg(PROG ": --exit-file: directory of '%s' is not writable", k->exit_file);
        free(dir);
        if (!ok)
            return -1;
    }
    k->cmd = argv + i;
    return 0;
}

/* ---- main ---------------------------------------------------------------- */

/* Could not start the command: report, clean up, exit 125. */
static void fail_start(struct keeper *k, enum reason why, const char *error, int err)
{
    k->reason = why;
    report_final(k, error, err);
    keeper_free(k);
    exit(EXIT_USAGE);
}

int main(int argc, char **argv)
{
    struct keeper k;
    sigset_t set, fdset;
    const char *what = "fork";
    int r;

    memset(&k, 0, sizeof k);
    k.report_fd = k.control_fd = k.sigfd = -1;
    k.grace_ms = DEFAULT_GRACE_MS;
    k.reason = RS_EXIT;
    k.pdeath_sig = SIGRTMIN + 2;
    if (parse_args(&k, argc, argv) < 0)
        return EXIT_USAGE;
    k.me = (int)getpid();

    /* Signal dispositions and mask as we found them, for the child. */
    memset(&k.dfl, 0, sizeof k.dfl);
    k.dfl.sa_handler = SIG_DFL;
    sigemptyset(&k.dfl.sa_mask);
    sigaction(SIGCHLD, NULL, &k.orig_chld);
    if (k.orig_chld.sa_handler == SIG_IGN)
        sigaction(SIGCHLD, &k.dfl, NULL); /* else children would be auto-reaped */

    r = rr_set_child_subreaper(1);
    if (r < 0) {
        msg(PROG ": prctl(PR_SET_CHILD_SUBREAPER): %s", strerror(-r));
        return EXIT_USAGE;
    }
    sigemptyset(&fdset);
    sigaddset(&fdset, SIGCHLD);
    sigaddset(&fdset, SIGTERM);
    sigaddset(&fdset, SIGINT);
    sigaddset(&fdset, SIGHUP);
    sigaddset(&fdset, SIGQUIT);
    sigaddset(&fdset, k.pdeath_sig);
    set = fdset;
    sigaddset(&set, SIGPIPE); /* blocked only: a dead report reader gives EPIPE */
    if (sigprocmask(SIG_BLOCK, &set, &k.orig_mask) < 0) {
        msg(PROG ": sigprocmask: %s", strerror(errno));
        return EXIT_USAGE;
    }
    k.sigfd = signalfd(-1, &fdset, SFD_NONBLOCK | SFD_CLOEXEC);
    if (k.sigfd < 0) {
        msg(PROG ": signalfd: %s", strerror(errno));
        keeper_free(&k);
        return EXIT_USAGE;
    }
    if (k.report_fd >= 0)
        set_cloexec(k.report_fd);
    if (k.control_fd >= 0)
        set_cloexec(k.control_fd);

    if (k.die_with_parent) {
        if (prctl(PR_SET_PDEATHSIG, (unsigned long)k.pdeath_sig, 0UL, 0UL, 0UL) < 0) {
            msg(PROG ": prctl(PR_SET_PDEATHSIG): %s", strerror(errno));
            keeper_free(&k);
            return EXIT_USAGE;
        }
        if (getppid() != k.parent_pid)
            fail_start(&k, RS_PARENT_DIED, "parent_died", 0);
    }

    r = start_command(&k, &what);
    if (r < 0) {
        msg(PROG ": cannot start %s: %s: %s", k.cmd[0], what, strerror(-r));
        fail_start(&k, RS_ERROR, what, -r);
    }
    if (k.exec_errno) {
        if (!k.quiet)
            msg(PROG ": %s: %s", k.cmd[0], strerror(k.exec_errno));
    } else {
        struct jbuf j;

        memset(&j, 0, sizeof j);
        jb_add(&j, "{\"event\":\"started\",\"pid\":%d}", k.cmd_pid);
        report_line(&k, &j);
    }

    if (k.timeout_ms > 0)
        k.run_deadline = mono_ns() + (int64_t)k.timeout_ms * NS_PER_MS;
    main_loop(&k);

    report_final(&k, NULL, 0);
    keeper_free(&k);
    if (!k.cmd_reaped) {
        msg(PROG ": gave up: the command (pid %d) could not be killed", k.cmd_pid);
        return EXIT_USAGE;
    }
    if (k.gave_up)
        msg(PROG ": gave up: a process of the tree could not be killed");
    mirror_exit(k.cmd_status);
    return EXIT_USAGE;
}
