/*
 * Helpers for the benchmarks under tests/bench: a monotonic clock and this
 * machine's memory bandwidth, so that a figure can be printed next to what the
 * hardware allows. Not thread-safe to call concurrently (bench_membw_gbps
 * starts its own threads).
 */
#ifndef SPOOL_BENCH_UTIL_H
#define SPOOL_BENCH_UTIL_H

#include <stddef.h>

/* Seconds on CLOCK_MONOTONIC. */
double bench_now(void);

/*
 * CPU seconds used by the calling thread (CLOCK_THREAD_CPUTIME_ID): on a
 * shared machine, time spent descheduled does not count, which makes
 * single-thread figures far steadier than wall time.
 */
double bench_cpu_now(void);

/*
 * Measures memory bandwidth in GB/s (1e9 bytes/s) with a STREAM-style triad,
 * a[i] = b[i] + s * c[i] over three arrays of doubles of bytes / 3 each
 * (choose bytes well above the last-level cache, e.g. 768 MiB), split among
 * threads pthreads, each first touching its own slice. Counts 24 bytes per
 * element (two reads, one write, as STREAM does) and returns the best of 5
 * runs, or a negative number when memory or threads cannot be had.
 */
double bench_membw_gbps(size_t bytes, int threads);

#endif
