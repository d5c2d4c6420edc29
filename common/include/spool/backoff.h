/*
 * Capped exponential backoff with full jitter.
 *
 * Attempt n (counting from 0 since the last reset) waits a delay drawn
 * uniformly from [0, min(cap_ms, base_ms * 2^n)] milliseconds. Full jitter
 * spreads the retries of many clients that lost the same server at the same
 * moment, so that they do not all come back in the same millisecond.
 *
 * The generator is a small deterministic PRNG (splitmix64) seeded by the
 * caller: the same seed gives the same sequence of delays, which tests rely
 * on. Not thread-safe; one struct per retry loop. No allocation.
 */
#ifndef SPOOL_BACKOFF_H
#define SPOOL_BACKOFF_H

#include <stdint.h>

struct sp_backoff {
    unsigned base_ms; /* bound of the first delay */
    unsigned cap_ms;  /* bound of every delay */
    unsigned attempt; /* delays handed out since the last reset (saturates) */
    uint64_t rng;     /* PRNG state */
};

/* Sets up b. base_ms 0 is treated as 1; a cap_ms below base_ms is raised to base_ms. */
void sp_backoff_init(struct sp_backoff *b, unsigned base_ms, unsigned cap_ms, uint64_t seed);

/*
 * Returns the next delay in milliseconds, in [0, min(cap_ms, base_ms * 2^attempt)],
 * and advances attempt. Never overflows, however often it is called.
 */
unsigned sp_backoff_next(struct sp_backoff *b);

/* Starts over from the first delay (after a success); keeps the PRNG state. */
void sp_backoff_reset(struct sp_backoff *b);

/* Returns the current upper bound (the one the next call of sp_backoff_next draws under). */
unsigned sp_backoff_ceiling(const struct sp_backoff *b);

#endif
