/*
 * The sweep, run every cfg.sweep_ms and on every NOTIFY that may mean new
 * work or free room, by the active scheduler only. One sweep at a time; a
 * request during one runs another right after. Each step is one query on
 * the work connection, chained through callbacks:
 *
 *   1. SELECT count(*) FROM spool.expire_leases()   lost leases -> pending
 *   2. SELECT spool.plan_queued(shard_size)         queued jobs -> shards
 *   3. spool.worker_load(ids)                       each worker's leased requests
 *   4. spool.placement_candidates(max)              pending shards, in order
 *   5. sched_place() in C, then per placement:
 *      spool.lease_shard(shard, worker, ttl) -> ASSIGN with the new token
 *
 * Beside the chain, each sweep queues SELECT spool.finalize_batches() on the
 * Batch API's connection (s->batchdb; unless one is still queued there), which
 * writes the output and error files of OpenAI batches whose jobs have ended
 * (migration 0009); a job's end NOTIFYs spool_job_done, which sweeps.
 *
 * A lease_shard that returns NULL (the shard was cancelled or taken
 * meanwhile) sends nothing. A lease whose worker disconnected before the
 * result came back is left to expire. Every callback checks the epoch: a
 * scheduler that stepped down meanwhile stops the chain.
 */
#include "scheduler.h"
#include "metrics.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "placement.h"
#include "spool/error.h"
#include "spool/log.h"

struct sweep {
    struct sched *s;
    uint64_t epoch;
    struct sched_worker **workers; /* referenced, registered and connected at step 3 */
    size_t n_workers;
    int pending; /* lease_shard queries outstanding */
};

struct lease_ctx {
    struct sweep *sw;
    struct sched_worker *w;
    uint64_t shard_id, job_id;
    char model_name[129];
    uint32_t model_version;
    char digest[72];
};

static void sweep_end(struct sweep *sw)
{
    struct sched *s = sw->s;
    for (size_t i = 0; i < sw->n_workers; i++)
        sched_worker_unref(sw->workers[i]);
    free(sw->workers);
    free(sw);
    s->sweeping = false;
    if (s->sweep_again && !s->stopping) {
        s->sweep_again = false;
        sched_sweep(s);
    }
}

/* False when the chain must stop: the scheduler stepped down or is stopping. */
static bool still_current(const struct sweep *sw)
{
    const struct sched *s = sw->s;
    return !s->stopping && s->active && sw->epoch == s->epoch && sched_db_up(s);
}

static void on_lease(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct lease_ctx *lc = arg;
    struct sweep *sw = lc->sw;
    struct sched_worker *w = lc->w;
    if (err) {
        sp_warn("leasing shard %" PRIu64 ": %s", lc->shard_id, err);
    } else if (PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
        uint64_t token = strtoull(PQgetvalue(res, 0, 0), NULL, 10);
        if (sw->s->active && sw->epoch == sw->s->epoch && w->conn && w->state == SW_ACTIVE) {
            struct sp_wire_frame f = {.type = SP_WIRE_ASSIGN};
            f.assign = (struct sp_wire_assign){
                .shard_id = lc->shard_id,
                .job_id = lc->job_id,
                .lease_token = token,
                .model = {lc->model_name, lc->model_version, lc->digest},
                .lease_ms = sw->s->cfg.lease_ttl_ms,
            };
            if (sp_wire_conn_send(w->conn, &f) == 0) {
                sched_worker_add_digest(w, lc->digest);
                sched_metrics_shard_assigned(sw->s, w->id, lc->shard_id, lc->model_name,
                                             lc->model_version);
                sp_info("assigned shard %" PRIu64 " of job %" PRIu64 " to worker %" PRId64
                        " (%s), token %" PRIu64,
                        lc->shard_id, lc->job_id, w->id, w->name, token);
            }
        } else {
            sp_info("shard %" PRIu64 " leased to worker %" PRId64
                    " which is gone; the lease will expire",
                    lc->shard_id, w->id);
        }
    }
    sched_worker_unref(w);
    free(lc);
    if (--sw->pending == 0)
        sweep_end(sw);
}

/*
 * A worker that has missed three heartbeats (or a whole lease ttl, if that
 * is shorter) is likely dead or hung: its leases are about to expire, so it
 * gets nothing new until it speaks again.
 */
static bool silent(struct sched *s, const struct sched_worker *w)
{
    uint64_t limit = 3ull * s->cfg.heartbeat_ms;
    if (limit > s->cfg.lease_ttl_ms)
        limit = s->cfg.lease_ttl_ms;
    uv_update_time(s->loop);
    return uv_now(s->loop) - w->last_beat > limit;
}

static void on_candidates(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct sweep *sw = arg;
    struct sched *s = sw->s;
    if (err || !still_current(sw)) {
        if (err)
            sp_warn("reading placement candidates: %s", err);
        sweep_end(sw);
        return;
    }
    size_t n = (size_t)PQntuples(res);
    struct place_shard *shards = calloc(n ? n : 1, sizeof *shards);
    struct place_assignment *out = calloc(n ? n : 1, sizeof *out);
    struct place_worker *pw = calloc(sw->n_workers ? sw->n_workers : 1, sizeof *pw);
    if (!shards || !out || !pw) {
        free(shards);
        free(out);
        free(pw);
        sweep_end(sw);
        return;
    }
    /* Columns: shard_id, job_id, n_requests, priority, deadline_epoch, tenant,
     * tenant_weight, tenant_leased, model_name, model_version, model_digest. */
    for (size_t i = 0; i < n; i++) {
        shards[i] = (struct place_shard){
            .n_requests = atoi(PQgetvalue(res, (int)i, 2)),
            .priority = atoi(PQgetvalue(res, (int)i, 3)),
            .tenant = PQgetvalue(res, (int)i, 5),
            .tenant_weight = strtod(PQgetvalue(res, (int)i, 6), NULL),
            .tenant_leased = strtoll(PQgetvalue(res, (int)i, 7), NULL, 10),
            .digest = PQgetvalue(res, (int)i, 10),
        };
    }
    for (size_t i = 0; i < sw->n_workers; i++) {
        struct sched_worker *w = sw->workers[i];
        int64_t target = (int64_t)s->cfg.fill * w->max_batch;
        pw[i] = (struct place_worker){
            .load = w->load,
            .target = target > 0 ? target : 1,
            .accepting = w->state == SW_ACTIVE && w->conn && !silent(s, w),
            .digests = (const char *const *)w->digests,
            .n_digests = w->n_digests,
        };
    }
    int placed = sched_place(pw, sw->n_workers, shards, n, out);
    for (size_t i = 0; i < sw->n_workers; i++)
        sw->workers[i]->load = pw[i].load;
    for (int i = 0; i < placed; i++) {
        int row = (int)out[i].shard;
        struct lease_ctx *lc = calloc(1, sizeof *lc);
        if (!lc)
            break;
        lc->sw = sw;
        lc->w = sw->workers[out[i].worker];
        lc->shard_id = strtoull(PQgetvalue(res, row, 0), NULL, 10);
        lc->job_id = strtoull(PQgetvalue(res, row, 1), NULL, 10);
        snprintf(lc->model_name, sizeof lc->model_name, "%s", PQgetvalue(res, row, 8));
        lc->model_version = (uint32_t)strtoul(PQgetvalue(res, row, 9), NULL, 10);
        snprintf(lc->digest, sizeof lc->digest, "%s", PQgetvalue(res, row, 10));
        char worker_id[24];
        snprintf(worker_id, sizeof worker_id, "%" PRId64, lc->w->id);
        const char *p[] = {PQgetvalue(res, row, 0), worker_id, s->ttl_interval};
        sched_worker_ref(lc->w);
        if (sp_pgconn_query(s->db, "SELECT spool.lease_shard($1, $2, $3::interval)", 3, p, on_lease,
                            lc) != 0) {
            sched_worker_unref(lc->w);
            free(lc);
            continue;
        }
        sw->pending++;
    }
    free(shards);
    free(out);
    free(pw);
    if (sw->pending == 0)
        sweep_end(sw);
}

static void on_load(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct sweep *sw = arg;
    struct sched *s = sw->s;
    if (err || !still_current(sw)) {
        if (err)
            sp_warn("reading worker load: %s", err);
        sweep_end(sw);
        return;
    }
    for (size_t i = 0; i < sw->n_workers; i++)
        sw->workers[i]->load = 0;
    for (int r = 0; r < PQntuples(res); r++) {
        int64_t id = strtoll(PQgetvalue(res, r, 0), NULL, 10);
        for (size_t i = 0; i < sw->n_workers; i++)
            if (sw->workers[i]->id == id)
                sw->workers[i]->load = strtoll(PQgetvalue(res, r, 1), NULL, 10);
    }
    bool any = false;
    for (size_t i = 0; i < sw->n_workers; i++)
        any |= sw->workers[i]->state == SW_ACTIVE;
    if (!any) {
        sweep_end(sw);
        return;
    }
    char max[16];
    snprintf(max, sizeof max, "%u", s->cfg.max_candidates);
    const char *p[] = {max};
    if (sp_pgconn_query(s->db,
                        "SELECT shard_id, job_id, n_requests, priority, deadline_epoch, tenant, "
                        "tenant_weight, tenant_leased, model_name, model_version, model_digest "
                        "FROM spool.placement_candidates($1)",
                        1, p, on_candidates, sw) != 0)
        sweep_end(sw);
}

static void on_plan(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct sweep *sw = arg;
    struct sched *s = sw->s;
    if (err || !still_current(sw)) {
        if (err)
            sp_warn("planning queued jobs: %s", err);
        sweep_end(sw);
        return;
    }
    long planned = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    if (planned > 0)
        sp_info("planned %ld shard%s", planned, planned == 1 ? "" : "s");

    /* Snapshot the registered, connected workers, holding a reference each. */
    size_t n = 0;
    for (struct sched_worker *w = s->workers; w; w = w->next)
        n += w->state == SW_ACTIVE || w->state == SW_DRAINING;
    if (n == 0) {
        sweep_end(sw);
        return;
    }
    sw->workers = calloc(n, sizeof *sw->workers);
    size_t len = 2 + n * 21;
    char *ids = malloc(len);
    if (!sw->workers || !ids) {
        free(ids);
        sweep_end(sw);
        return;
    }
    size_t at = 0;
    ids[at++] = '{';
    for (struct sched_worker *w = s->workers; w; w = w->next) {
        if (w->state != SW_ACTIVE && w->state != SW_DRAINING)
            continue;
        sched_worker_ref(w);
        sw->workers[sw->n_workers++] = w;
        at += (size_t)snprintf(ids + at, len - at, "%s%" PRId64, at > 1 ? "," : "", w->id);
    }
    snprintf(ids + at, len - at, "}");
    const char *p[] = {ids};
    int rc = sp_pgconn_query(s->db, "SELECT worker_id, leased_requests FROM spool.worker_load($1)",
                             1, p, on_load, sw);
    free(ids);
    if (rc != 0)
        sweep_end(sw);
}

static void on_expire(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct sweep *sw = arg;
    struct sched *s = sw->s;
    if (err || !still_current(sw)) {
        if (err)
            sp_warn("expiring leases: %s", err);
        sweep_end(sw);
        return;
    }
    long expired = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    if (expired > 0)
        sp_info("%ld lease%s expired; the shards are pending again", expired,
                expired == 1 ? "" : "s");
    char size[16];
    snprintf(size, sizeof size, "%d", s->cfg.shard_size);
    const char *p[] = {size};
    if (sp_pgconn_query(s->db, "SELECT spool.plan_queued($1)", 1, p, on_plan, sw) != 0)
        sweep_end(sw);
}

static void on_finalized(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct sched *s = arg;
    s->finalizing = false;
    if (err) {
        if (!s->stopping)
            sp_warn("finalizing batches: %s", err);
    } else if (strcmp(PQgetvalue(res, 0, 0), "0") != 0)
        sp_info("finalized %s batch(es): output and error files written", PQgetvalue(res, 0, 0));
}

void sched_sweep(struct sched *s)
{
    if (s->stopping || !s->active || !sched_db_up(s))
        return;
    if (s->sweeping) {
        s->sweep_again = true;
        return;
    }
    struct sweep *sw = calloc(1, sizeof *sw);
    if (!sw)
        return;
    sw->s = s;
    sw->epoch = s->epoch;
    s->sweeping = true;
    /* On the Batch API's connection, one at a time: writing a big output file takes a while. */
    if (s->batchdb && !s->finalizing &&
        sp_pgconn_query(s->batchdb, "SELECT spool.finalize_batches()", 0, NULL, on_finalized, s) ==
            0)
        s->finalizing = true;
    if (sp_pgconn_query(s->db, "SELECT count(*) FROM spool.expire_leases()", 0, NULL, on_expire,
                        sw) != 0)
        sweep_end(sw);
}

static void on_sweep_timer(uv_timer_t *t)
{
    sched_sweep(t->data);
}

int sched_sweep_init(struct sched *s)
{
    uv_timer_init(s->loop, &s->sweep_timer);
    s->sweep_timer.data = s;
    return uv_timer_start(&s->sweep_timer, on_sweep_timer, s->cfg.sweep_ms, s->cfg.sweep_ms)
               ? SP_EIO
               : 0;
}

void sched_sweep_stop(struct sched *s)
{
    uv_timer_stop(&s->sweep_timer);
    uv_close((uv_handle_t *)&s->sweep_timer, NULL);
}
