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

#include <stddef.h>
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

/*
 * Batch-lane bookkeeping from the worker protocol (sweep.c, workers.c).
 * The scheduler remembers, per (worker, shard), the model it assigned and
 * the output tokens already counted, so that PROGRESS (cumulative
 * tokens_out) and the shard's final USAGE feed sched_metrics_batch_tokens
 * with increments and nothing is counted twice. A shard it did not assign
 * (one leased by a scheduler before a failover) counts under model
 * "unknown". DONE counts the shard's requests by status (succeeded,
 * failed); requests finished before a RELEASE are not counted.
 */
void sched_metrics_shard_assigned(struct sched *s, int64_t worker_id, uint64_t shard_id,
                                  const char *model_name, uint32_t model_version);
void sched_metrics_shard_progress(struct sched *s, int64_t worker_id, uint64_t shard_id,
                                  uint64_t tokens_out);
void sched_metrics_shard_usage(struct sched *s, int64_t worker_id, uint64_t shard_id,
                               uint64_t tokens_in, uint64_t tokens_out);
/* DONE (succeeded, failed) or RELEASE (0, 0): the shard leaves the worker. */
void sched_metrics_shard_end(struct sched *s, int64_t worker_id, uint64_t shard_id,
                             uint64_t succeeded, uint64_t failed);

/*
 * Renders every metric (worker gauges refreshed first) into a new buffer
 * (*out, the caller frees it) of *len bytes. Returns 0, SP_ESTATE before
 * sched_metrics_init, or SP_ENOMEM. The GET /metrics handler sends this.
 */
int sched_metrics_render(struct sched *s, char **out, size_t *len);

/* The route table entry for GET /metrics (no key needed). */
extern const struct sh_route sched_metrics_routes[];
extern const int sched_metrics_n_routes;

#endif
