/*
 * The scheduler's Prometheus metrics (GET /metrics, text format 0.0.4, every
 * name prefixed spool_). Counters and histograms are kept in the scheduler's
 * memory and fed by the code that sees the event; gauges about workers (state,
 * capacity type, KV blocks, queued and running sequences) are read from the
 * worker table and its last heartbeats when /metrics is scraped.
 *
 * Everything runs on the scheduler's loop thread; nothing here is
 * thread-safe.
 */
#ifndef SPOOL_SCHEDULER_METRICS_H
#define SPOOL_SCHEDULER_METRICS_H

#include <stdint.h>

#include "http.h"

struct sched;

int sched_metrics_init(struct sched *s);
void sched_metrics_stop(struct sched *s);

/*
 * One finished live request: model is "name@version"; status the HTTP status
 * sent; ttft_s the time to first token (< 0: no token was sent); tpot_s the
 * mean time per output token after the first (< 0: fewer than two tokens);
 * e2e_s headers in to last byte out.
 */
void sched_metrics_live_done(struct sched *s, const char *model, int status, double ttft_s,
                             double tpot_s, double e2e_s, uint32_t tokens_in, uint32_t tokens_out);
/* Tokens of batch-lane work, as workers report them (lane "batch"). */
void sched_metrics_batch_tokens(struct sched *s, const char *model, uint64_t tokens_in,
                                uint64_t tokens_out);
/* A worker reported a preemption notice (source: "sigterm", "aws", ...). */
void sched_metrics_preemption(struct sched *s, const char *source);

/* The route table entry for GET /metrics (no key needed). */
extern const struct sh_route sched_metrics_routes[];
extern const int sched_metrics_n_routes;

#endif
