/*
 * stamp: the benchmarks' exec'd child.  It writes CLOCK_MONOTONIC (ns) into a
 * shared record just before _exit(2), so the parent can compute "time of
 * wake minus time of exit" without any syscall of its own in the hot path.
 *
 * Where the stamps go: a MAP_SHARED file of fixed-size records (struct rec,
 * 32 bytes), one per slot.  The parent creates the file (a /dev/shm file,
 * given with -f PATH, or an inherited memfd, given with -m FD), maps it once,
 * and reads the records with plain loads.  The child maps only the page(s)
 * holding its slot(s), at start-up (before it waits), so the only work
 * between the stamp and the exit is one store.  Without -f/-m nothing is
 * stamped (used where only the process itself matters, e.g. spawn cost).
 *
 *   stamp [-f PATH | -m FD] [-s SLOT] [-c CODE] [-w FD] [-d USEC] [-t | -i | -T N]
 *
 *   -s SLOT  record index (default 0)
 *   -c CODE  exit code (default 0)
 *   -w FD    first mark the record ready, then block until one byte or EOF
 *            can be read from FD (a burst: many children read one pipe whose
 *            write end the parent closes to release them all at once)
 *   -d USEC  sleep this long (after -w) before stamping and exiting
 *   -t       cooperative: on SIGTERM stamp and _exit(CODE); mark ready, then
 *            wait for signals for ever
 *   -i       SIGTERM-ignoring: on SIGTERM stamp term_ns (first one only) and
 *            carry on; mark ready, then wait for ever (only SIGKILL ends it)
 *   -T N     tree: this process and N-1 descendants, recorded in slots
 *            SLOT..SLOT+N-1 (pid, then ready).  Node k forks nodes
 *            4k+1..4k+4.  Node j with j % 10 == 7 is a daemon detached the
 *            classic way (fork, setsid in the grandchild, the middle process
 *            exits and is reaped by node k), so it leaves the tree and the
 *            session; node j with j % 10 == 3 moves to its own process group.
 *            Every node then waits for signals with the default actions.
 *
 * Exit codes: CODE normally, 2 bad usage, 3 cannot map the record file.
 * Built with -Wall -Wextra -Werror by benchmarks/run.py; never shipped.
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
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct rec {
    int64_t exit_ns; /* CLOCK_MONOTONIC just before _exit */
    int64_t term_ns; /* CLOCK_MONOTONIC when SIGTERM arrived (-i) */
    int64_t pid;     /* getpid(), tree nodes and -w/-t/-i children */
    int64_t flags;   /* REC_READY once set up (handlers installed, tree built) */
};

#define REC_READY 1
#define TREE_BRANCH 4

static struct rec *recs; /* recs[0] is this process's slot; NULL: no stamping */
static int exit_code;
static long tree_n;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void set_ready(struct rec *r)
{
    if (r != NULL) {
        __atomic_store_n(&r->pid, (int64_t)getpid(), __ATOMIC_RELAXED);
        __atomic_store_n(&r->flags, (int64_t)REC_READY, __ATOMIC_RELEASE);
    }
}

/* Async-signal-safe: clock_gettime, a store, _exit. */
static void stamp_and_exit(void)
{
    if (recs != NULL)
        __atomic_store_n(&recs[0].exit_ns, now_ns(), __ATOMIC_RELEASE);
    _exit(exit_code);
}

static void on_term_exit(int sig)
{
    (void)sig;
    stamp_and_exit();
}

static void on_term_ignore(int sig)
{
    (void)sig;
    if (recs != NULL && __atomic_load_n(&recs[0].term_ns, __ATOMIC_RELAXED) == 0)
        __atomic_store_n(&recs[0].term_ns, now_ns(), __ATOMIC_RELEASE);
}

static void wait_forever(void)
{
    for (;;)
        pause();
}

static long parse_long(const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "stamp: bad number %s\n", s);
        _exit(2);
    }
    return v;
}

/* Map records [slot, slot + count) of the file open on fd. */
static struct rec *map_records(int fd, long slot, long count)
{
    long page = sysconf(_SC_PAGESIZE);
    off_t off = (off_t)slot * (off_t)sizeof(struct rec);
    off_t start = off & ~((off_t)page - 1);
    size_t len = (size_t)(off - start) + (size_t)count * sizeof(struct rec);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, start);
    if (p == MAP_FAILED) {
        perror("stamp: mmap");
        _exit(3);
    }
    return (struct rec *)((char *)p + (off - start));
}

static void tree_node(long k);

static void tree_spawn(long j)
{
    int detached = (j % 10 == 7);
    pid_t p = fork();
    if (p < 0)
        return; /* the parent never sees node j ready and times out */
    if (p == 0) {
        if (detached) {
            pid_t q = fork();
            if (q < 0)
                _exit(1);
            if (q > 0)
                _exit(0);
            setsid();
        } else if (j % 10 == 3) {
            setpgid(0, 0);
        }
        tree_node(j);
    }
    if (detached) {
        int st;
        while (waitpid(p, &st, 0) < 0 && errno == EINTR)
            ;
    }
}

static void tree_node(long k)
{
    for (long c = 1; c <= TREE_BRANCH; c++) {
        long j = k * TREE_BRANCH + c;
        if (j >= tree_n)
            break;
        tree_spawn(j);
    }
    set_ready(&recs[k]);
    wait_forever();
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    int map_fd = -1, wait_fd = -1, mode = 0;
    long slot = 0, delay_us = 0;
    int opt;
    while ((opt = getopt(argc, argv, "f:m:s:c:w:d:tiT:")) != -1) {
        switch (opt) {
        case 'f': path = optarg; break;
        case 'm': map_fd = (int)parse_long(optarg, 0, 1 << 30); break;
        case 's': slot = parse_long(optarg, 0, 1L << 24); break;
        case 'c': exit_code = (int)parse_long(optarg, 0, 255); break;
        case 'w': wait_fd = (int)parse_long(optarg, 0, 1 << 30); break;
        case 'd': delay_us = parse_long(optarg, 0, 3600L * 1000000L); break;
        case 't': mode = 't'; break;
        case 'i': mode = 'i'; break;
        case 'T':
            mode = 'T';
            tree_n = parse_long(optarg, 1, 1L << 20);
            break;
        default:
            fprintf(stderr, "usage: stamp [-f PATH | -m FD] [-s SLOT] [-c CODE] [-w FD] "
                            "[-d USEC] [-t | -i | -T N]\n");
            return 2;
        }
    }
    if (path != NULL) {
        map_fd = open(path, O_RDWR | O_CLOEXEC);
        if (map_fd < 0) {
            perror("stamp: open");
            return 3;
        }
    }
    if (map_fd >= 0) {
        recs = map_records(map_fd, slot, mode == 'T' ? tree_n : 1);
        close(map_fd);
    }
    if (mode == 'T') {
        if (recs == NULL) {
            fprintf(stderr, "stamp: -T needs -f or -m\n");
            return 2;
        }
        tree_node(0);
    }
    if (mode == 't' || mode == 'i') {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = mode == 't' ? on_term_exit : on_term_ignore;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGTERM, &sa, NULL);
        set_ready(recs);
        wait_forever();
    }
    if (wait_fd >= 0) {
        char c;
        set_ready(recs);
        while (read(wait_fd, &c, 1) < 0 && errno == EINTR)
            ;
    }
    if (delay_us > 0) {
        struct timespec ts = {delay_us / 1000000, (delay_us % 1000000) * 1000};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
    stamp_and_exit();
    return 0;
}
