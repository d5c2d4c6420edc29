/*
 * API keys, rate limits and the record of live requests, for the HTTP front.
 *
 * Keys live in spool.api_keys (migration 0007) as the hex SHA-256 of the key;
 * the scheduler hashes the bearer token and looks the hash up, caching what
 * it found (for a short time, and until NOTIFY spool_api_keys says the key
 * was revoked). Rate limits are token buckets per key, in the scheduler's
 * memory. Live requests are recorded in PostgreSQL in batches, off the path
 * of any token.
 *
 * Everything runs on the scheduler's loop thread; nothing here is
 * thread-safe.
 */
#ifndef SPOOL_SCHEDULER_AUTH_H
#define SPOOL_SCHEDULER_AUTH_H

#include <stdbool.h>
#include <stdint.h>

#include "http.h"

struct sched;

int sched_auth_init(struct sched *s);
void sched_auth_stop(struct sched *s);

/*
 * The outcome of a key check: p is the caller (valid during the callback
 * only), or NULL with status 401 (missing, malformed, unknown or revoked key)
 * or 503 (the database cannot be asked now) and a message for the client.
 */
typedef void (*sched_auth_cb)(void *arg, const struct sched_principal *p, int status,
                              const char *message);
/*
 * Checks an Authorization header value ("Bearer sk-..."; NULL when absent).
 * cb runs exactly once: at once when the answer is cached, else from the
 * loop after a query.
 */
void sched_auth_check(struct sched *s, const char *authorization, sched_auth_cb cb, void *arg);
/* A NOTIFY on spool_api_keys (payload: the key id): forget that key. */
void sched_auth_forget(struct sched *s, const char *payload);

/*
 * Admits one request of p that expects to use about tokens tokens (prompt
 * plus max_tokens). Returns true and takes the request and the tokens from
 * p's buckets, or false with *retry_after_s (whole seconds until it would be
 * admitted) and *which ("requests" or "tokens") set.
 */
bool sched_rate_admit(struct sched *s, const struct sched_principal *p, uint32_t tokens,
                      uint32_t *retry_after_s, const char **which);
/* Corrects p's token bucket once the real count is known (delta = real - expected). */
void sched_rate_settle(struct sched *s, const struct sched_principal *p, int64_t delta);

/* One finished live request, for spool.live_requests. */
struct sched_live_record {
    int64_t key_id;
    const char *tenant;
    int64_t model_id;     /* the exact version that served it */
    const char *endpoint; /* "/v1/chat/completions" */
    int status;           /* HTTP status sent */
    uint32_t tokens_in, tokens_out;
    double ttft_s;             /* time to first token, 0 when none */
    double latency_s;          /* headers in to last byte out */
    int64_t worker_id;         /* 0 when none */
    const char *finish_reason; /* may be NULL */
};
/* Queues r (copied) for the next batched INSERT; never blocks, never waits on the database. */
void sched_livelog_record(struct sched *s, const struct sched_live_record *r);

#endif
