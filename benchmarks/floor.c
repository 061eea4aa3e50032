/*
 * floor: the physical limit of the machine for each benchmark scenario.
 *
 * It forks and execs the stamp child (benchmarks/stamp.c) and waits with
 * blocking waitid(2), which is as fast as a process can learn of a child's
 * exit.  The stamps go to a memfd it creates and passes to the children
 * (stamp -m FD).  Output is plain numbers on stdout, parsed by
 * benchmarks/scenarios.py:
 *
 *   floor latency STAMP N BASE_US JITTER_US   one line per run: wake - stamp (ns)
 *       one child at a time, new session, exits after BASE_US + rand(JITTER_US);
 *       blocking waitid(P_PID)
 *   floor burst STAMP N                        "wall_ns cpu_ns children_ns reaped"
 *       N children block on one pipe; closing its write end releases them all;
 *       wall = close .. last waitid(P_ALL); cpu = own CPU time over that span;
 *       children_ns = last stamp - close (the children's own share)
 *   floor idle STAMP N WINDOW_MS               "cpu_ns window_ns"
 *       N blocked children, blocking waitid(P_ALL) for WINDOW_MS (ended by
 *       SIGALRM), own CPU over the window; then they are released and reaped
 *   floor stop STAMP N coop|ignore KILL_WAIT_MS  one line per run (ns)
 *       coop: kill(SIGTERM), blocking waitid; wake - exit stamp
 *       ignore: kill(SIGTERM), sleep KILL_WAIT_MS, kill(SIGKILL), blocking
 *       waitid; wake - (SIGTERM stamp + KILL_WAIT_MS)
 *   floor tree STAMP N REPS                    one line per run: "wall_ns reaped"
 *       as a child subreaper: a tree of N (stamp -T N, new session); kill(SIGTERM)
 *       to every member by pid (perfect knowledge, no discovery), then
 *       waitid(P_ALL) until all N are reaped (orphans come back to it)
 *
 * Exit status 0, or 1 with a message on stderr.  Built with -Wall -Wextra
 * -Werror by benchmarks/run.py; never shipped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_CHILD_SUBREAPER
#define PR_SET_CHILD_SUBREAPER 36
#endif

struct rec {
    int64_t exit_ns;
    int64_t term_ns;
    int64_t pid;
    int64_t flags;
};

static const char *stamp_path;
static int map_fd = -1;
static struct rec *recs;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* This process's CPU time (all threads), the clock behind Python's time.process_time. */
static int64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static long arg_long(const char *s)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < 0) {
        fprintf(stderr, "floor: bad number %s\n", s);
        exit(1);
    }
    return v;
}

static void setup_records(long n)
{
    map_fd = (int)syscall(SYS_memfd_create, "floor-stamps", 0U);
    if (map_fd < 0)
        die("memfd_create");
    if (ftruncate(map_fd, (off_t)(n * (long)sizeof(struct rec))) < 0)
        die("ftruncate");
    void *p = mmap(NULL, (size_t)n * sizeof(struct rec), PROT_READ | PROT_WRITE, MAP_SHARED,
                   map_fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    recs = p;
}

static void reset_records(long n)
{
    memset(recs, 0, (size_t)n * sizeof(struct rec));
}

static int64_t load(const int64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

/* fork + exec stamp with the given extra arguments (NULL-terminated). */
static pid_t spawn(long slot, int new_session, char *const extra[])
{
    char fd_s[16], slot_s[24];
    snprintf(fd_s, sizeof fd_s, "%d", map_fd);
    snprintf(slot_s, sizeof slot_s, "%ld", slot);
    char *argv[16];
    int i = 0;
    argv[i++] = (char *)stamp_path;
    argv[i++] = "-m";
    argv[i++] = fd_s;
    argv[i++] = "-s";
    argv[i++] = slot_s;
    for (int j = 0; extra[j] != NULL && i < 15; j++)
        argv[i++] = extra[j];
    argv[i] = NULL;
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        if (new_session)
            setsid();
        execv(stamp_path, argv);
        _exit(127);
    }
    return pid;
}

static void wait_ready(long first, long n)
{
    int64_t deadline = now_ns() + 60LL * 1000000000LL;
    for (long k = first; k < first + n; k++) {
        while (!(load(&recs[k].flags) & 1)) {
            if (now_ns() > deadline) {
                fprintf(stderr, "floor: record %ld never became ready\n", k);
                exit(1);
            }
            usleep(200);
        }
    }
}

static pid_t reap(idtype_t type, pid_t pid)
{
    siginfo_t si;
    for (;;) {
        memset(&si, 0, sizeof si);
        if (waitid(type, (id_t)pid, &si, WEXITED) == 0)
            return si.si_pid;
        if (errno != EINTR)
            return -1;
    }
}

static int cmd_latency(long n, long base_us, long jitter_us)
{
    setup_records(1);
    srand((unsigned)getpid());
    for (long i = 0; i < n; i++) {
        char d[32];
        long delay = base_us + (jitter_us > 0 ? rand() % jitter_us : 0);
        snprintf(d, sizeof d, "%ld", delay);
        char *extra[] = {"-d", d, NULL};
        reset_records(1);
        pid_t pid = spawn(0, 1, extra);
        if (reap(P_PID, pid) != pid)
            die("waitid");
        int64_t woke = now_ns();
        printf("%lld\n", (long long)(woke - load(&recs[0].exit_ns)));
    }
    return 0;
}

static int make_release_pipe(int *rfd, int *wfd)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        die("pipe2");
    /* children inherit the read end only: the write end must close on exec */
    if (fcntl(p[0], F_SETFD, 0) < 0)
        die("fcntl");
    *rfd = p[0];
    *wfd = p[1];
    return 0;
}

static void spawn_blocked(long n, int rfd)
{
    char r[16];
    snprintf(r, sizeof r, "%d", rfd);
    char *extra[] = {"-w", r, NULL};
    for (long i = 0; i < n; i++)
        spawn(i, 0, extra);
    wait_ready(0, n);
}

static int cmd_burst(long n)
{
    int rfd, wfd;
    setup_records(n);
    make_release_pipe(&rfd, &wfd);
    spawn_blocked(n, rfd);
    int64_t c0 = cpu_ns();
    int64_t t0 = now_ns();
    close(wfd);
    long reaped = 0;
    while (reaped < n && reap(P_ALL, 0) > 0)
        reaped++;
    int64_t t1 = now_ns();
    int64_t c1 = cpu_ns();
    int64_t last = 0;
    for (long i = 0; i < n; i++) {
        int64_t s = load(&recs[i].exit_ns);
        if (s > last)
            last = s;
    }
    printf("%lld %lld %lld %ld\n", (long long)(t1 - t0), (long long)(c1 - c0),
           (long long)(last - t0), reaped);
    return 0;
}

static void on_alarm(int sig)
{
    (void)sig;
}

static int cmd_idle(long n, long window_ms)
{
    int rfd, wfd;
    setup_records(n);
    make_release_pipe(&rfd, &wfd);
    spawn_blocked(n, rfd);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm; /* no SA_RESTART: waitid returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it;
    memset(&it, 0, sizeof it);
    it.it_value.tv_sec = window_ms / 1000;
    it.it_value.tv_usec = (window_ms % 1000) * 1000;
    int64_t c0 = cpu_ns();
    int64_t t0 = now_ns();
    setitimer(ITIMER_REAL, &it, NULL);
    siginfo_t si;
    long reaped = 0;
    memset(&si, 0, sizeof si);
    if (waitid(P_ALL, 0, &si, WEXITED) == 0)
        reaped++; /* a child died early: still counted, still reaped */
    int64_t t1 = now_ns();
    int64_t c1 = cpu_ns();
    close(wfd);
    while (reaped < n && reap(P_ALL, 0) > 0)
        reaped++;
    printf("%lld %lld\n", (long long)(c1 - c0), (long long)(t1 - t0));
    return 0;
}

static int cmd_stop(long n, const char *how, long kill_wait_ms)
{
    int ignore = strcmp(how, "ignore") == 0;
    if (!ignore && strcmp(how, "coop") != 0) {
        fprintf(stderr, "floor: stop mode must be coop or ignore\n");
        return 1;
    }
    setup_records(1);
    for (long i = 0; i < n; i++) {
        char *extra[] = {ignore ? "-i" : "-t", NULL};
        reset_records(1);
        pid_t pid = spawn(0, 1, extra);
        wait_ready(0, 1);
        int64_t sent = now_ns();
        kill(pid, SIGTERM);
        if (ignore) {
            int64_t at = sent + kill_wait_ms * 1000000LL;
            struct timespec ts = {(time_t)(at / 1000000000LL), (long)(at % 1000000000LL)};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
                ;
            kill(pid, SIGKILL);
        }
        if (reap(P_PID, pid) != pid)
            die("waitid");
        int64_t woke = now_ns();
        int64_t ref = ignore ? load(&recs[0].term_ns) + kill_wait_ms * 1000000LL
                             : load(&recs[0].exit_ns);
        printf("%lld\n", (long long)(woke - ref));
    }
    return 0;
}

static int cmd_tree(long n, long reps)
{
    if (prctl(PR_SET_CHILD_SUBREAPER, 1UL, 0UL, 0UL, 0UL) < 0)
        die("prctl(PR_SET_CHILD_SUBREAPER)");
    setup_records(n);
    char nn[24];
    snprintf(nn, sizeof nn, "%ld", n);
    for (long r = 0; r < reps; r++) {
        char *extra[] = {"-T", nn, NULL};
        reset_records(n);
        spawn(0, 1, extra);
        wait_ready(0, n);
        int64_t t0 = now_ns();
        for (long k = 0; k < n; k++)
            kill((pid_t)load(&recs[k].pid), SIGTERM);
        long reaped = 0;
        while (reaped < n && reap(P_ALL, 0) > 0)
            reaped++;
        int64_t t1 = now_ns();
        printf("%lld %ld\n", (long long)(t1 - t0), reaped);
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: floor latency|burst|idle|stop|tree STAMP N ...\n");
        return 1;
    }
    const char *cmd = argv[1];
    stamp_path = argv[2];
    long n = arg_long(argv[3]);
    if (n < 1)
        n = 1;
    if (strcmp(cmd, "latency") == 0 && argc == 6)
        return cmd_latency(n, arg_long(argv[4]), arg_long(argv[5]));
    if (strcmp(cmd, "burst") == 0 && argc == 4)
        return cmd_burst(n);
    if (strcmp(cmd, "idle") == 0 && argc == 5)
        return cmd_idle(n, arg_long(argv[4]));
    if (strcmp(cmd, "stop") == 0 && argc == 6)
        return cmd_stop(n, argv[4], arg_long(argv[5]));
    if (strcmp(cmd, "tree") == 0 && argc == 5)
        return cmd_tree(n, arg_long(argv[4]));
    fprintf(stderr, "floor: bad arguments for %s\n", cmd);
    return 1;
}
