/* Benchmark helpers: clock and STREAM-triad memory bandwidth (see bench_util.h). */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "bench_util.h"

#define TRIAD_RUNS 5

double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double bench_cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct triad_slice {
    double *a, *b, *c;
    size_t n;
    int init; /* 1: first touch (fill), 0: run the triad */
};

static void *triad_thread(void *arg)
{
    struct triad_slice *t = arg;
    double *restrict a = t->a, *restrict b = t->b, *restrict c = t->c;
    if (t->init) {
        for (size_t i = 0; i < t->n; i++) {
            a[i] = 0.0;
            b[i] = 1.0;
            c[i] = 2.0;
        }
    } else {
        const double s = 3.0;
        for (size_t i = 0; i < t->n; i++)
            a[i] = b[i] + s * c[i];
    }
    return NULL;
}

/* Runs one pass on all threads; returns its wall time, or -1 if a thread cannot start. */
static double triad_pass(struct triad_slice *sl, pthread_t *tid, int threads, int init)
{
    double t0 = bench_now();
    int started = 0, rc = 0;
    for (int i = 0; i < threads; i++) {
        sl[i].init = init;
        if (pthread_create(&tid[i], NULL, triad_thread, &sl[i]) != 0) {
            rc = -1;
            break;
        }
        started++;
    }
    for (int i = 0; i < started; i++)
        pthread_join(tid[i], NULL);
    return rc < 0 ? -1.0 : bench_now() - t0;
}

double bench_membw_gbps(size_t bytes, int threads)
{
    if (threads < 1)
        threads = 1;
    size_t n = bytes / 3 / sizeof(double);
    double *a = malloc(n * sizeof(double)), *b = malloc(n * sizeof(double)),
           *c = malloc(n * sizeof(double));
    struct triad_slice *sl = calloc((size_t)threads, sizeof(*sl));
    pthread_t *tid = calloc((size_t)threads, sizeof(*tid));
    double best = -1.0;
    if (!a || !b || !c || !sl || !tid || n == 0)
        goto out;
    for (int i = 0; i < threads; i++) {
        size_t lo = n * (size_t)i / (size_t)threads, hi = n * (size_t)(i + 1) / (size_t)threads;
        sl[i] = (struct triad_slice){a + lo, b + lo, c + lo, hi - lo, 1};
    }
    if (triad_pass(sl, tid, threads, 1) < 0)
        goto out;
    for (int r = 0; r < TRIAD_RUNS; r++) {
        double t = triad_pass(sl, tid, threads, 0);
        if (t < 0)
            goto out;
        double gbps = 3.0 * (double)n * sizeof(double) / t * 1e-9;
        if (gbps > best)
            best = gbps;
    }
    /* Keeps the compiler from dropping the stores. */
    if (a[n / 2] != 7.0)
        best = -1.0;
out:
    free(a);
    free(b);
    free(c);
    free(sl);
    free(tid);
    return best;
}
