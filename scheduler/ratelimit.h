/*
 * Per-key rate limits for the HTTP lane: the state behind sched_rate_admit
 * and sched_rate_settle (auth.h).
 *
 * Each API key with a limit has two token buckets, one for requests and one
 * for tokens (prompt plus completion). A bucket holds at most its
 * per-minute limit and refills continuously at limit / 60 per second, so a
 * key may burst up to its whole minute's allowance and then goes at the
 * steady rate. A request is admitted only when both buckets can pay for it;
 * then both are charged at once (never one without the other).
 *
 * A request expecting more tokens than the key's whole minute (tpm) waits
 * until the bucket is full and is then admitted, leaving the bucket in debt
 * (negative) so that the following requests wait for it to refill; refusing
 * it forever would be the only alternative.
 *
 * Buckets live in an open-addressing hash table keyed by key id. A bucket
 * that has refilled completely is the same as none: such buckets are
 * dropped whenever the table would grow, so it stays as large as the number
 * of keys used within the last minute or so.
 *
 * Everything runs on the scheduler's loop thread; nothing here is
 * thread-safe.
 */
#ifndef SPOOL_SCHEDULER_RATELIMIT_H
#define SPOOL_SCHEDULER_RATELIMIT_H

#include <stddef.h>

struct sched;
struct sched_rate;

/* A monotonic clock in seconds. */
typedef double (*sched_rate_clock)(void *arg);

/*
 * Creates an empty table reading time from clock(arg) (NULL: the monotonic
 * uv_hrtime). Returns NULL when out of memory. Free it with sched_rate_free.
 * sched_rate_admit creates s->rate itself on first use; tests create it
 * first to control the clock.
 */
struct sched_rate *sched_rate_new(sched_rate_clock clock, void *arg);
void sched_rate_free(struct sched_rate *r);
/* Buckets held now (keys seen recently whose buckets are not yet full again). */
size_t sched_rate_size(const struct sched_rate *r);

/* Frees s->rate (shutdown); a later sched_rate_admit starts afresh. */
void sched_rate_stop(struct sched *s);

#endif
