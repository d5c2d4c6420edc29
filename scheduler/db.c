/*
 * The work connection: every query of the scheduler except the leadership
 * lock, and LISTEN on the batch lane's channels:
 *
 *   spool_jobs      a job was sealed or a shard went back to pending: sweep
 *   spool_job_done  a job finished, so its workers have room: sweep
 *   spool_cancel    a job was cancelled: REVOKE its leases on their workers
 *   spool_api_keys  an API key was revoked: forget it (every role, since
 *                   standbys serve HTTP too)
 *
 * sp_pgconn re-issues the LISTENs after a reconnect, before on_up; on_up
 * then sweeps, which catches up with whatever was notified while the
 * connection was down.
 */
#include "scheduler.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "spool/error.h"
#include "spool/log.h"

bool sched_db_up(const struct sched *s)
{
    return s->db && s->schema_checked && sp_pgconn_is_up(s->db);
}

struct revoke_ctx {
    struct sched *s;
    uint64_t epoch;
};

static void on_cancelled_leases(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct revoke_ctx *ctx = arg;
    struct sched *s = ctx->s;
    bool current = !s->stopping && s->active && ctx->epoch == s->epoch;
    free(ctx);
    if (err) {
        sp_warn("reading a cancelled job's leases: %s", err);
        return;
    }
    if (!current)
        return;
    for (int i = 0; i < PQntuples(res); i++) {
        int64_t shard = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        int64_t worker = strtoll(PQgetvalue(res, i, 1), NULL, 10);
        uint64_t token = strtoull(PQgetvalue(res, i, 2), NULL, 10);
        struct sched_worker *w = sched_worker_find(s, worker);
        if (!w || !w->conn)
            continue;
        struct sp_wire_frame f = {.type = SP_WIRE_REVOKE};
        f.revoke = (struct sp_wire_revoke){(uint64_t)shard, token, "cancelled"};
        if (sp_wire_conn_send(w->conn, &f) == 0)
            sp_info("revoked shard %" PRId64 " (token %" PRIu64 ") on worker %" PRId64
                    ": its job was cancelled",
                    shard, token, worker);
    }
}

static void on_notify(sp_pgconn_t *c, const char *channel, const char *payload, void *arg)
{
    (void)c;
    struct sched *s = arg;
    sp_debug("NOTIFY %s '%s'", channel, payload);
    if (strcmp(channel, "spool_api_keys") == 0) {
        sched_auth_forget(s, payload && *payload ? payload : "0");
        return;
    }
    if (!s->active || s->stopping)
        return;
    if (strcmp(channel, "spool_cancel") == 0) {
        struct revoke_ctx *ctx = malloc(sizeof *ctx);
        if (!ctx)
            return;
        *ctx = (struct revoke_ctx){s, s->epoch};
        const char *p[] = {payload};
        if (sp_pgconn_query(
                s->db, "SELECT shard_id, worker_id, lease_token FROM spool.cancelled_leases($1)", 1,
                p, on_cancelled_leases, ctx) != 0)
            free(ctx);
        return;
    }
    sched_sweep(s);
}

/*
 * The schema check: the scheduler needs 0004's functions. A database
 * without them is a setup error that waiting will not fix: exit 1.
 */
static void on_schema(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct sched *s = arg;
    if (s->stopping)
        return;
    if (err && res) {
        sp_error("the database has no Spool schema (run 'spool db migrate'): %s", err);
        sched_shutdown(s, 1);
        return;
    }
    if (err) /* the connection broke: checked again on the next on_up */
        return;
    if (strcmp(PQgetvalue(res, 0, 1), "t") != 0) {
        sp_error("the database's Spool schema (%s) predates this scheduler: "
                 "spool.placement_candidates is missing; run 'spool db migrate'",
                 PQgetvalue(res, 0, 0));
        sched_shutdown(s, 1);
        return;
    }
    s->schema_checked = true;
    sp_info("schema %s", PQgetvalue(res, 0, 0));
    sched_leader_db_up(s);
}

static void on_up(sp_pgconn_t *c, void *arg)
{
    (void)c;
    struct sched *s = arg;
    sp_info("work connection ready");
    /* NOTIFYs may have been missed while the connection was down. */
    sched_auth_forget(s, "");
    if (!s->schema_checked) {
        sp_pgconn_query(s->db,
                        "SELECT spool.schema_version(), "
                        "to_regproc('spool.placement_candidates') IS NOT NULL",
                        0, NULL, on_schema, s);
        return;
    }
    if (s->active)
        sched_sweep(s);
    else
        sched_leader_db_up(s);
}

static void on_down(sp_pgconn_t *c, const char *err, void *arg)
{
    (void)c;
    struct sched *s = arg;
    sp_warn("work connection lost: %s", err);
    sched_leader_db_lost(s, err);
}

int sched_db_open(struct sched *s)
{
    struct sp_pgconn_opts o = {
        .backoff_base_ms = 100,
        .backoff_cap_ms = 1000,
        .connect_timeout_ms = 5000,
        .queue_wait_ms = 5000,
        .on_up = on_up,
        .on_down = on_down,
        .on_notify = on_notify,
        .arg = s,
    };
    int rc = sp_pgconn_open(s->loop, s->cfg.dsn, &o, &s->db);
    if (rc)
        return rc;
    static const char *const channels[] = {"spool_jobs", "spool_cancel", "spool_job_done",
                                           "spool_api_keys"};
    for (size_t i = 0; i < sizeof channels / sizeof channels[0]; i++)
        if ((rc = sp_pgconn_listen(s->db, channels[i])) != 0)
            return rc;
    return 0;
}

void sched_db_close(struct sched *s)
{
    if (s->db)
        sp_pgconn_close(s->db, NULL, NULL);
    s->db = NULL;
}
