/*
 * Per-key token buckets (see ratelimit.h for the policy): sched_rate_admit
 * and sched_rate_settle of auth.h.
 */
#include "ratelimit.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

#include <uv.h>

#include "auth.h"
#include "scheduler.h"
#include "spool/log.h"

#define EMPTY_KEY INT64_MIN
#define MIN_SLOTS 16

struct bucket {
    int64_t key_id;    /* EMPTY_KEY: free slot */
    double req, tok;   /* requests and tokens available now (tok may be negative: debt) */
    double t;          /* when req and tok were last brought up to date, seconds */
    uint32_t rpm, tpm; /* the limits the buckets were filled for (0: unlimited) */
};

struct sched_rate {
    sched_rate_clock clock;
    void *clock_arg;
    struct bucket *slots; /* cap slots, cap a power of two, at most half used */
    size_t cap, n;
};

static double hr_clock(void *arg)
{
    (void)arg;
    return (double)uv_hrtime() * 1e-9;
}

static struct bucket *alloc_slots(size_t cap)
{
    struct bucket *b = malloc(cap * sizeof *b);
    if (b)
        for (size_t i = 0; i < cap; i++)
            b[i].key_id = EMPTY_KEY;
    return b;
}

struct sched_rate *sched_rate_new(sched_rate_clock clock, void *arg)
{
    struct sched_rate *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->clock = clock ? clock : hr_clock;
    r->clock_arg = arg;
    r->cap = MIN_SLOTS;
    r->slots = alloc_slots(r->cap);
    if (!r->slots) {
        free(r);
        return NULL;
    }
    return r;
}

void sched_rate_free(struct sched_rate *r)
{
    if (!r)
        return;
    free(r->slots);
    free(r);
}

size_t sched_rate_size(const struct sched_rate *r)
{
    return r ? r->n : 0;
}

void sched_rate_stop(struct sched *s)
{
    sched_rate_free(s->rate);
    s->rate = NULL;
}

static size_t slot_of(int64_t key, size_t cap)
{
    uint64_t z = (uint64_t)key + 0x9E3779B97F4A7C15u;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return (size_t)(z ^ (z >> 31)) & (cap - 1);
}

/* Brings b up to time now under the limits rpm and tpm (which may have changed). */
static void refill(struct bucket *b, double now, uint32_t rpm, uint32_t tpm)
{
    double dt = now - b->t;
    if (dt < 0)
        dt = 0;
    b->t = now;
    if (rpm != b->rpm) /* a new limit: start full if there was none, else keep what is left */
        b->req = b->rpm == 0 ? rpm : fmin(b->req, rpm);
    else if (rpm)
        b->req = fmin(rpm, b->req + dt * rpm / 60.0);
    if (tpm != b->tpm)
        b->tok = b->tpm == 0 ? tpm : fmin(b->tok, tpm);
    else if (tpm)
        b->tok = fmin(tpm, b->tok + dt * tpm / 60.0);
    b->rpm = rpm;
    b->tpm = tpm;
}

static bool is_full(const struct bucket *b)
{
    return (b->rpm == 0 || b->req >= b->rpm) && (b->tpm == 0 || b->tok >= b->tpm);
}

static struct bucket *lookup(struct sched_rate *r, int64_t key)
{
    for (size_t i = slot_of(key, r->cap);; i = (i + 1) & (r->cap - 1)) {
        if (r->slots[i].key_id == key)
            return &r->slots[i];
        if (r->slots[i].key_id == EMPTY_KEY)
            return NULL;
    }
}

static struct bucket *place(struct sched_rate *r, int64_t key)
{
    size_t i = slot_of(key, r->cap);
    while (r->slots[i].key_id != EMPTY_KEY)
        i = (i + 1) & (r->cap - 1);
    r->n++;
    return &r->slots[i];
}

/*
 * Makes room for one more bucket: rebuilds the table without the buckets that
 * have refilled completely, doubling it if it would still be over half full.
 * Returns false when out of memory (the table is left as it was).
 */
static bool make_room(struct sched_rate *r, double now)
{
    if ((r->n + 1) * 2 <= r->cap)
        return true;
    size_t keep = 0;
    for (size_t i = 0; i < r->cap; i++) {
        struct bucket *b = &r->slots[i];
        if (b->key_id == EMPTY_KEY)
            continue;
        refill(b, now, b->rpm, b->tpm);
        if (!is_full(b))
            keep++;
    }
    size_t cap = MIN_SLOTS;
    while ((keep + 1) * 2 > cap)
        cap *= 2;
    struct bucket *old = r->slots, *fresh = alloc_slots(cap);
    if (!fresh)
        return false;
    size_t old_cap = r->cap;
    r->slots = fresh;
    r->cap = cap;
    r->n = 0;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i].key_id != EMPTY_KEY && !is_full(&old[i]))
            *place(r, old[i].key_id) = old[i];
    free(old);
    return true;
}

/* The bucket of p, created full when absent; NULL when out of memory. */
static struct bucket *bucket_of(struct sched_rate *r, const struct sched_principal *p, double now)
{
    struct bucket *b = lookup(r, p->key_id);
    if (!b) {
        if (!make_room(r, now))
            return NULL;
        b = place(r, p->key_id);
        *b = (struct bucket){.key_id = p->key_id,
                             .req = p->rpm_limit,
                             .tok = p->tpm_limit,
                             .t = now,
                             .rpm = p->rpm_limit,
                             .tpm = p->tpm_limit};
    }
    refill(b, now, p->rpm_limit, p->tpm_limit);
    return b;
}

static struct sched_rate *rate_of(struct sched *s)
{
    if (!s->rate && !(s->rate = sched_rate_new(NULL, NULL)))
        sp_error("rate limits: out of memory; requests are admitted without limits");
    return s->rate;
}

bool sched_rate_admit(struct sched *s, const struct sched_principal *p, uint32_t tokens,
                      uint32_t *retry_after_s, const char **which)
{
    if (p->rpm_limit == 0 && p->tpm_limit == 0)
        return true;
    struct sched_rate *r = rate_of(s);
    if (!r)
        return true;
    struct bucket *b = bucket_of(r, p, r->clock(r->clock_arg));
    if (!b)
        return true; /* out of memory: admitting beats refusing everyone */
    /* Seconds until each bucket can pay for this request. */
    double wait_req = 0, wait_tok = 0;
    if (p->rpm_limit && b->req < 1)
        wait_req = (1 - b->req) * 60.0 / p->rpm_limit;
    double need = fmin((double)tokens, (double)p->tpm_limit);
    if (p->tpm_limit && b->tok < need)
        wait_tok = (need - b->tok) * 60.0 / p->tpm_limit;
    if (wait_req > 0 || wait_tok > 0) {
        double wait = fmax(wait_req, wait_tok);
        /* Whole seconds, rounded up; the epsilon absorbs refill arithmetic's rounding. */
        double secs = ceil(wait - 1e-9);
        *retry_after_s = secs < 1 ? 1 : secs > UINT32_MAX ? UINT32_MAX : (uint32_t)secs;
        *which = wait_tok > wait_req ? "tokens" : "requests";
        return false;
    }
    if (p->rpm_limit)
        b->req -= 1;
    if (p->tpm_limit)
        b->tok -= tokens;
    return true;
}

void sched_rate_settle(struct sched *s, const struct sched_principal *p, int64_t delta)
{
    if (p->tpm_limit == 0 || delta == 0)
        return;
    struct sched_rate *r = rate_of(s);
    if (!r)
        return;
    struct bucket *b = bucket_of(r, p, r->clock(r->clock_arg));
    if (b)
        b->tok = fmin((double)p->tpm_limit, b->tok - (double)delta);
}
