/*
 * The scheduler's Prometheus metrics (metrics.h): a registry (spool/prom.h)
 * of counters and histograms fed as events happen, and worker gauges
 * recomputed from s->workers at each scrape.
 *
 * Metrics (labels in braces):
 *   spool_time_to_first_token_seconds{lane,model}       histogram
 *   spool_time_per_output_token_seconds{lane,model}     histogram
 *   spool_request_duration_seconds{lane,model}          histogram
 *   spool_requests_total{lane,model,status}             counter
 *   spool_tokens_total{direction,lane,model}            counter
 *   spool_preemptions_total{source}                     counter
 *   spool_workers{state,capacity}                       gauge
 *   spool_worker_{running,queued}_sequences{worker}     gauge
 *   spool_worker_kv_blocks_{used,total}{worker}         gauge
 *   spool_worker_free_slots{worker}, spool_worker_max_batch{worker},
 *   spool_worker_heartbeat_age_seconds{worker}          gauge
 *   spool_scheduler_active                              gauge
 */
#include "metrics.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler.h"
#include "spool/error.h"
#include "spool/log.h"
#include "spool/prom.h"

/* Label sets that come from outside (model names, worker names, drain
 * reasons) are capped per family, so a misbehaving client cannot grow the
 * scheduler's memory without bound. */
#define MAX_MODEL_SERIES  2000  /* histograms: 2 lanes x 1,000 models */
#define MAX_TOKEN_SERIES  4000  /* 2 directions x 2 lanes x 1,000 models */
#define MAX_STATUS_SERIES 20000 /* about 10 statuses per lane and model */
#define MAX_WORKER_SERIES 10000
#define MAX_SOURCES       64

/* (worker, shard) pairs remembered for batch token accounting. */
#define MAX_SHARDS 4096

struct shard_rec {
    int64_t worker_id;
    uint64_t shard_id;
    uint64_t out_seen; /* output tokens already counted */
    uint64_t used;     /* a use stamp: the least recently used record is evicted */
    char model[160];   /* "name@version" */
};

struct sched_metrics {
    sp_prom_t *reg;
    sp_prom_family_t *ttft, *tpot, *e2e, *requests, *tokens, *preemptions;
    sp_prom_family_t *workers, *running, *queued, *kv_used, *kv_total, *free_slots, *max_batch,
        *beat_age, *active;
    struct shard_rec *shards; /* MAX_SHARDS, in use when shard_id != 0 */
    uint64_t clock;
    bool warned; /* a label set was refused once (logged once) */
};

static const double ttft_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                                      0.3,   0.5,  0.75,  1,    2.5,   5,   10,   30};
static const double tpot_buckets[] = {0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02,
                                      0.03,  0.05,   0.075, 0.1,    0.25, 0.5,   1};
static const double e2e_buckets[] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,  2.5,
                                     5,    10,    30,   60,  120,  300, 600};

static const char *const lane_model[] = {"lane", "model", NULL};
static const char *const lane_model_status[] = {"lane", "model", "status", NULL};
static const char *const dir_lane_model[] = {"direction", "lane", "model", NULL};
static const char *const source_label[] = {"source", NULL};
static const char *const state_capacity[] = {"state", "capacity", NULL};
static const char *const worker_label[] = {"worker", NULL};

/* Logs a refused update once; the metric is then simply not counted. */
static void check(struct sched_metrics *m, int rc)
{
    if (rc == 0 || m->warned)
        return;
    m->warned = true;
    sp_warn("metrics: %s (further such errors are not logged)", sp_prom_errmsg(m->reg));
}

static void metrics_free(struct sched_metrics *m)
{
    if (!m)
        return;
    sp_prom_free(m->reg);
    free(m->shards);
    free(m);
}

int sched_metrics_init(struct sched *s)
{
    struct sched_metrics *m = calloc(1, sizeof *m);
    if (!m || sp_prom_new(&m->reg) != 0 ||
        (m->shards = calloc(MAX_SHARDS, sizeof *m->shards)) == NULL) {
        metrics_free(m);
        return SP_ENOMEM;
    }
    const struct {
        sp_prom_family_t **f;
        struct sp_prom_spec spec;
    } fams[] = {
        {&m->ttft,
         {SP_PROM_HISTOGRAM, "spool_time_to_first_token_seconds",
          "Time from a request's arrival to its first output token.", lane_model, ttft_buckets,
          sizeof ttft_buckets / sizeof *ttft_buckets, MAX_MODEL_SERIES}},
        {&m->tpot,
         {SP_PROM_HISTOGRAM, "spool_time_per_output_token_seconds",
          "Mean time per output token after the first, per request.", lane_model, tpot_buckets,
          sizeof tpot_buckets / sizeof *tpot_buckets, MAX_MODEL_SERIES}},
        {&m->e2e,
         {SP_PROM_HISTOGRAM, "spool_request_duration_seconds",
          "End-to-end request latency, headers in to last byte out.", lane_model, e2e_buckets,
          sizeof e2e_buckets / sizeof *e2e_buckets, MAX_MODEL_SERIES}},
        {&m->requests,
         {SP_PROM_COUNTER, "spool_requests_total",
          "Requests finished, by lane, exact model version and status (HTTP status for the "
          "live lane; succeeded or failed for the batch lane).",
          lane_model_status, NULL, 0, MAX_STATUS_SERIES}},
        {&m->tokens,
         {SP_PROM_COUNTER, "spool_tokens_total",
          "Tokens processed, by direction (in: prompt, out: generated), lane and model.",
          dir_lane_model, NULL, 0, MAX_TOKEN_SERIES}},
        {&m->preemptions,
         {SP_PROM_COUNTER, "spool_preemptions_total",
          "Preemption notices reported by workers (DRAIN), by the reason they gave.", source_label,
          NULL, 0, MAX_SOURCES}},
        {&m->workers,
         {SP_PROM_GAUGE, "spool_workers",
          "Connected workers by state (registering, active, silent: missed three heartbeats, "
          "draining) and capacity type.",
          state_capacity, NULL, 0, 0}},
        {&m->running,
         {SP_PROM_GAUGE, "spool_worker_running_sequences",
          "Sequences in the worker's engine, from its last heartbeat.", worker_label, NULL, 0,
          MAX_WORKER_SERIES}},
        {&m->queued,
         {SP_PROM_GAUGE, "spool_worker_queued_sequences",
          "Sequences waiting for admission on the worker, from its last heartbeat.", worker_label,
          NULL, 0, MAX_WORKER_SERIES}},
        {&m->kv_used,
         {SP_PROM_GAUGE, "spool_worker_kv_blocks_used",
          "KV cache blocks in use on the worker, from its last heartbeat.", worker_label, NULL, 0,
          MAX_WORKER_SERIES}},
        {&m->kv_total,
         {SP_PROM_GAUGE, "spool_worker_kv_blocks_total",
          "KV cache blocks on the worker, from its last heartbeat.", worker_label, NULL, 0,
          MAX_WORKER_SERIES}},
        {&m->free_slots,
         {SP_PROM_GAUGE, "spool_worker_free_slots",
          "Sequences the worker's engine could admit now, from its last heartbeat.", worker_label,
          NULL, 0, MAX_WORKER_SERIES}},
        {&m->max_batch,
         {SP_PROM_GAUGE, "spool_worker_max_batch",
          "Most sequences the worker's engine runs at once (from REGISTER).", worker_label, NULL, 0,
          MAX_WORKER_SERIES}},
        {&m->beat_age,
         {SP_PROM_GAUGE, "spool_worker_heartbeat_age_seconds",
          "Seconds since the worker's last heartbeat (or registration).", worker_label, NULL, 0,
          MAX_WORKER_SERIES}},
        {&m->active,
         {SP_PROM_GAUGE, "spool_scheduler_active",
          "1 while this scheduler holds the leadership lock (workers connect to it), else 0.", NULL,
          NULL, 0, 0}},
    };
    for (size_t i = 0; i < sizeof fams / sizeof *fams; i++) {
        int rc = sp_prom_family(m->reg, &fams[i].spec, fams[i].f);
        if (rc) {
            sp_error("metrics: %s", sp_prom_errmsg(m->reg));
            metrics_free(m);
            return rc;
        }
    }
    s->metrics = m;
    return 0;
}

void sched_metrics_stop(struct sched *s)
{
    metrics_free(s->metrics);
    s->metrics = NULL;
}

/* ---- Events --------------------------------------------------------------- */

void sched_metrics_live_done(struct sched *s, const char *model, int status, double ttft_s,
                             double tpot_s, double e2e_s, uint32_t tokens_in, uint32_t tokens_out)
{
    struct sched_metrics *m = s->metrics;
    if (!m)
        return;
    char st[16];
    snprintf(st, sizeof st, "%d", status);
    const char *lm[] = {"live", model ? model : ""};
    const char *lms[] = {"live", lm[1], st};
    const char *in[] = {"in", "live", lm[1]};
    const char *out[] = {"out", "live", lm[1]};
    check(m, sp_prom_inc(m->requests, lms, 1));
    if (ttft_s >= 0)
        check(m, sp_prom_observe(m->ttft, lm, ttft_s));
    if (tpot_s >= 0)
        check(m, sp_prom_observe(m->tpot, lm, tpot_s));
    if (e2e_s >= 0)
        check(m, sp_prom_observe(m->e2e, lm, e2e_s));
    check(m, sp_prom_inc(m->tokens, in, tokens_in));
    check(m, sp_prom_inc(m->tokens, out, tokens_out));
}

void sched_metrics_batch_tokens(struct sched *s, const char *model, uint64_t tokens_in,
                                uint64_t tokens_out)
{
    struct sched_metrics *m = s->metrics;
    if (!m)
        return;
    const char *in[] = {"in", "batch", model ? model : ""};
    const char *out[] = {"out", "batch", in[2]};
    if (tokens_in)
        check(m, sp_prom_inc(m->tokens, in, (double)tokens_in));
    if (tokens_out)
        check(m, sp_prom_inc(m->tokens, out, (double)tokens_out));
}

void sched_metrics_preemption(struct sched *s, const char *source)
{
    struct sched_metrics *m = s->metrics;
    if (!m)
        return;
    const char *v[] = {source && *source ? source : "unknown"};
    check(m, sp_prom_inc(m->preemptions, v, 1));
}

/* ---- Batch shards --------------------------------------------------------- */

static struct shard_rec *shard_find(struct sched_metrics *m, int64_t worker_id, uint64_t shard_id)
{
    for (size_t i = 0; i < MAX_SHARDS; i++)
        if (m->shards[i].shard_id == shard_id && m->shards[i].worker_id == worker_id) {
            m->shards[i].used = ++m->clock;
            return &m->shards[i];
        }
    return NULL;
}

/* A record for (worker, shard): the existing one, a free one, or the least recently used. */
static struct shard_rec *shard_get(struct sched_metrics *m, int64_t worker_id, uint64_t shard_id)
{
    struct shard_rec *r = shard_find(m, worker_id, shard_id);
    if (r)
        return r;
    r = &m->shards[0];
    for (size_t i = 0; i < MAX_SHARDS && r->shard_id != 0; i++)
        if (m->shards[i].shard_id == 0 || m->shards[i].used < r->used)
            r = &m->shards[i];
    *r = (struct shard_rec){.worker_id = worker_id, .shard_id = shard_id, .used = ++m->clock};
    snprintf(r->model, sizeof r->model, "unknown");
    return r;
}

void sched_metrics_shard_assigned(struct sched *s, int64_t worker_id, uint64_t shard_id,
                                  const char *model_name, uint32_t model_version)
{
    struct sched_metrics *m = s->metrics;
    if (!m || shard_id == 0)
        return;
    struct shard_rec *r = shard_get(m, worker_id, shard_id);
    r->out_seen = 0;
    snprintf(r->model, sizeof r->model, "%s@%" PRIu32, model_name, model_version);
}

/* Counts the output tokens of a cumulative total that were not counted yet. */
static void count_out(struct sched *s, struct shard_rec *r, uint64_t tokens_in, uint64_t tokens_out)
{
    uint64_t delta = tokens_out > r->out_seen ? tokens_out - r->out_seen : 0;
    if (tokens_out > r->out_seen)
        r->out_seen = tokens_out;
    sched_metrics_batch_tokens(s, r->model, tokens_in, delta);
}

void sched_metrics_shard_progress(struct sched *s, int64_t worker_id, uint64_t shard_id,
                                  uint64_t tokens_out)
{
    struct sched_metrics *m = s->metrics;
    if (!m || shard_id == 0)
        return;
    count_out(s, shard_get(m, worker_id, shard_id), 0, tokens_out);
}

void sched_metrics_shard_usage(struct sched *s, int64_t worker_id, uint64_t shard_id,
                               uint64_t tokens_in, uint64_t tokens_out)
{
    struct sched_metrics *m = s->metrics;
    if (!m || shard_id == 0)
        return;
    count_out(s, shard_get(m, worker_id, shard_id), tokens_in, tokens_out);
}

void sched_metrics_shard_end(struct sched *s, int64_t worker_id, uint64_t shard_id,
                             uint64_t succeeded, uint64_t failed)
{
    struct sched_metrics *m = s->metrics;
    if (!m || shard_id == 0)
        return;
    struct shard_rec *r = shard_find(m, worker_id, shard_id);
    const char *model = r ? r->model : "unknown";
    const char *ok[] = {"batch", model, "succeeded"};
    const char *bad[] = {"batch", model, "failed"};
    if (succeeded)
        check(m, sp_prom_inc(m->requests, ok, (double)succeeded));
    if (failed)
        check(m, sp_prom_inc(m->requests, bad, (double)failed));
    if (r)
        *r = (struct shard_rec){0};
}

/* ---- Scrape --------------------------------------------------------------- */

/* Same rule as the sweep's: three missed heartbeats, or a whole lease ttl if shorter. */
static bool silent(const struct sched *s, const struct sched_worker *w, uint64_t now)
{
    uint64_t limit = 3ull * s->cfg.heartbeat_ms;
    if (limit > s->cfg.lease_ttl_ms)
        limit = s->cfg.lease_ttl_ms;
    return now - w->last_beat > limit;
}

static void refresh_workers(struct sched *s)
{
    struct sched_metrics *m = s->metrics;
    sp_prom_family_t *per_worker[] = {m->running,    m->queued,    m->kv_used,  m->kv_total,
                                      m->free_slots, m->max_batch, m->beat_age, m->workers};
    for (size_t i = 0; i < sizeof per_worker / sizeof *per_worker; i++)
        sp_prom_clear(per_worker[i]);
    static const char *const states[] = {"registering", "active", "silent", "draining"};
    static const char *const caps[] = {"spot", "on-demand"};
    for (size_t i = 0; i < 4; i++)
        for (size_t j = 0; j < 2; j++) {
            const char *v[] = {states[i], caps[j]};
            check(m, sp_prom_set(m->workers, v, 0));
        }
    check(m, sp_prom_set(m->active, NULL, s->active ? 1 : 0));
    uv_update_time(s->loop);
    uint64_t now = uv_now(s->loop);
    /* s->workers is newest first: when a reconnected worker still has its old
     * connection listed, the newest connection's values are the ones shown. */
    for (const struct sched_worker *w = s->workers; w; w = w->next) {
        if (!w->conn || w->state == SW_NEW || w->state == SW_CLOSED)
            continue;
        const char *state = w->state == SW_REGISTERING ? "registering"
                            : w->state == SW_DRAINING  ? "draining"
                            : silent(s, w, now)        ? "silent"
                                                       : "active";
        const char *sc[] = {state, sp_wire_capacity_name(w->capacity)};
        check(m, sp_prom_inc(m->workers, sc, 1));
        if (w->state == SW_REGISTERING)
            continue;
        const char *name[] = {w->name};
        double seen;
        if (sp_prom_get(m->running, name, &seen) == 0)
            continue;
        uint32_t used =
            w->kv_blocks_total > w->kv_blocks_free ? w->kv_blocks_total - w->kv_blocks_free : 0;
        check(m, sp_prom_set(m->running, name, w->running));
        check(m, sp_prom_set(m->queued, name, w->queued));
        check(m, sp_prom_set(m->kv_used, name, used));
        check(m, sp_prom_set(m->kv_total, name, w->kv_blocks_total));
        check(m, sp_prom_set(m->free_slots, name, w->free_slots));
        check(m, sp_prom_set(m->max_batch, name, w->max_batch));
        check(m, sp_prom_set(m->beat_age, name,
                             now >= w->last_beat ? (double)(now - w->last_beat) / 1000.0 : 0));
    }
}

int sched_metrics_render(struct sched *s, char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    if (!s->metrics)
        return SP_ESTATE;
    refresh_workers(s);
    return sp_prom_render(s->metrics->reg, out, len);
}
