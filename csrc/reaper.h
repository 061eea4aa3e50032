/*
 * ralph-reaper C core: the kernel calls Python cannot make fast or at all.
 *
 * Every function returns a value >= 0 on success and -errno on failure; none
 * of them aborts, prints or allocates memory the caller must free.  Anything
 * newer than glibc 2.17 goes through syscall(2) so that wheels stay
 * manylinux2014-compatible.
 *
 * This header is also the cffi cdef: keep it free of preprocessor logic.
 */

/* Resource usage of a reaped child, as the kernel reported it. */
struct rr_rusage {
    double utime_s;       /* user CPU seconds */
    double stime_s;       /* system CPU seconds */
    long maxrss_kb;       /* peak resident set size, KiB */
};

/* One pidfd reaped (or found exited) by rr_epoll_drain. */
struct rr_event {
    unsigned long long token;  /* the caller's token given to rr_epoll_add */
    int fd;                    /* the pidfd, removed from the epoll set, still open */
    int result;                /* 1 reaped: status/rusage valid; 0 exited but not
                                  our child (status from exit info if have_status);
                                  -errno: waitid failed otherwise */
    int have_status;           /* 1 when status holds a wait status */
    int status;                /* wait status in waitpid(2) encoding */
    struct rr_rusage rusage;   /* valid when result == 1 */
};

int rr_pidfd_open(int pid);
int rr_pidfd_send_signal(int pidfd, int sig);
/* Signal every pidfd of fds[0..n); errs[i] gets 0 or -errno; returns how many succeeded. */
int rr_pidfd_send_signal_many(const int *fds, int n, int sig, int *errs);
/* waitid(P_PIDFD, WEXITED | (nohang ? WNOHANG : 0)): 1 reaped, 0 not yet exited, -errno. */
int rr_waitid_pidfd(int pidfd, int nohang, int *status, struct rr_rusage *rusage);
/* PIDFD_GET_INFO with PIDFD_INFO_EXIT: 1 and *status set, 0 when the kernel has
   no exit information (yet, or not supported: -ENOTTY/-EINVAL mapped to 0), -errno. */
int rr_pidfd_exit_status(int pidfd, int *status);
/* poll many fds for up to timeout_us microseconds (-1: forever; ppoll(2), so the
   wait ends at its deadline, not at the next whole millisecond): ready[i] = 1
   when fds[i] is readable; returns the count ready. */
int rr_poll_many(const int *fds, int n, long long timeout_us, unsigned char *ready);

int rr_epoll_create(void);
/* token must fit in 32 bits (the epoll data word also carries the fd): else -EOVERFLOW. */
int rr_epoll_add(int epfd, int fd, unsigned long long token);
int rr_epoll_del(int epfd, int fd);
/* Wait up to timeout_us microseconds (-1: forever) for readable pidfds in
   epfd, then for each one: remove it from the set and waitid(WNOHANG) it with
   rusage (falling back to PIDFD_INFO_EXIT when it is not our child).  The wait
   is epoll_pwait2 (Linux >= 5.11), so it ends at its deadline; older kernels
   (or a seccomp filter that refuses it) get epoll_wait in whole milliseconds,
   rounded up.  Fills at most cap events; returns the count, 0 on timeout,
   -errno on failure. */
int rr_epoll_drain(int epfd, long long timeout_us, struct rr_event *events, int cap);

int rr_set_child_subreaper(int on);
/* 1 or 0, or -errno. */
int rr_get_child_subreaper(void);

/* Fields of /proc/<pid>/stat this package needs. */
struct rr_proc_stat {
    char state;                   /* R S D Z T t X ... */
    int ppid;
    int pgrp;
    int session;
    unsigned long long starttime; /* clock ticks after boot (field 22) */
    int exit_code;                /* field 52: wait status of a zombie, else 0 */
    int threads;                  /* field 20: threads in the group, a zombie leader included */
    unsigned int flags;           /* field 9: the main thread's kernel flags (PF_*) */
};
/* 0 and *out filled, or -errno (-ENOENT/-ESRCH: no such process). */
int rr_proc_stat(int pid, struct rr_proc_stat *out);
/* Descendants of roots[0..nroots) (not the roots themselves), breadth
   first, without duplicates, zombies included.  Uses /proc/<pid>/task/<tid>/children where the
   kernel has it, else one scan of /proc/<pid>/stat.  Fills at most cap pids;
   returns the total found (may exceed cap: call again with more room). */
int rr_list_descendants(const int *roots, int nroots, int *out, int cap);
/* Every process whose session id is sid; same return convention. */
int rr_list_session(int sid, int *out, int cap);
