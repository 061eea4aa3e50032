/*
 * crowd: N idle processes that have nothing to do with any dispatch, the
 * "busy host" of scenario S7 (benchmarks/scenarios.py).
 *
 *   crowd N     forks N children that sleep in pause(); prints "ready N" on
 *               stdout once all exist, then sleeps in pause() itself
 *   crowd -o N  forks N children that read stdin until EOF; prints "ready N"
 *               and exits, so that they are orphaned to the nearest subreaper
 *
 * Without -o the children are its own, not the benchmark's: like most
 * processes on a real host they sit in another tree.  Each one asks to be
 * SIGKILLed when the crowd process dies (PR_SET_PDEATHSIG), so killing the
 * crowd process ends the whole crowd; they are reaped by whatever subreaper
 * inherits them.  With -o they become the children of the benchmark (a
 * subreaper): the worst case for a search that starts from a dispatch's
 * ancestors.  Closing their stdin ends them.
 *
 * Exit status 1 with a message on stderr if a fork fails (its children die
 * with it).  Built with -Wall -Wextra -Werror by benchmarks/run.py; never
 * shipped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int orphans = argc == 3 && strcmp(argv[1], "-o") == 0;
    if (argc != 2 && !orphans) {
        fprintf(stderr, "usage: crowd [-o] N\n");
        return 2;
    }
    long n = strtol(argv[argc - 1], NULL, 10);
    if (n < 0) {
        fprintf(stderr, "crowd: N must be >= 0\n");
        return 2;
    }
    pid_t self = getpid();
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            fprintf(stderr, "crowd: fork %ld of %ld: %s\n", i + 1, n, strerror(errno));
            return 1;
        }
        if (pid == 0 && orphans) {
            char c;
            for (;;) {
                ssize_t r = read(0, &c, 1);
                if (r == 0 || (r < 0 && errno != EINTR))
                    _exit(0);
            }
        }
        if (pid == 0) {
            if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() != self)
                _exit(0); /* its parent is gone already: so is the crowd */
            for (;;)
                pause();
        }
    }
    printf("ready %ld\n", n);
    fflush(stdout);
    if (orphans)
        return 0;
    for (;;)
        pause();
}
