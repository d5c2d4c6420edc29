#include "spool/backoff.h"

#include <limits.h>

void sp_backoff_init(struct sp_backoff *b, unsigned base_ms, unsigned cap_ms, uint64_t seed)
{
    b->base_ms = base_ms ? base_ms : 1;
    b->cap_ms = cap_ms < b->base_ms ? b->base_ms : cap_ms;
    b->attempt = 0;
    b->rng = seed;
}

void sp_backoff_reset(struct sp_backoff *b)
{
    b->attempt = 0;
}

unsigned sp_backoff_ceiling(const struct sp_backoff *b)
{
    /* Computed in 64 bits and stopped at the cap, so no shift ever overflows. */
    uint64_t ceil = b->base_ms;
    for (unsigned i = 0; i < b->attempt && ceil < b->cap_ms; i++)
        ceil <<= 1;
    return ceil > b->cap_ms ? b->cap_ms : (unsigned)ceil;
}

/* splitmix64: one add and a mix per draw; every state, zero included, is valid. */
static uint64_t next_u64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

unsigned sp_backoff_next(struct sp_backoff *b)
{
    unsigned ceil = sp_backoff_ceiling(b);
    if (b->attempt < UINT_MAX)
        b->attempt++;
    /* The modulo bias is below 2^-32 for bounds under 2^32: irrelevant for delays. */
    return (unsigned)(next_u64(&b->rng) % ((uint64_t)ceil + 1));
}
