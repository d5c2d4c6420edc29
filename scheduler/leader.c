/*
 * Leadership: exactly one scheduler is active. The active one holds a
 * session-level advisory lock (SCHED_LOCK_KEY) on a connection of its own,
 * so the lock lives exactly as long as that session: when the process dies
 * or the connection breaks, PostgreSQL releases it and a standby's next try
 * (every cfg.lock_retry_ms) wins. The lock is held on a dedicated
 * connection so that a long query on the work connection never delays the
 * standbys' view of it.
 *
 * The active scheduler stops acting (listener closed, workers dropped) as
 * soon as either connection is lost; with the work connection lost but the
 * lock connection alive it also unlocks, so that a standby with a working
 * database takes over.
 */
#include "scheduler.h"

#include <stdlib.h>
#include <string.h>

#include "spool/error.h"
#include "spool/log.h"

void sched_step_down(struct sched *s, const char *why)
{
    if (!s->active)
        return;
    if (s->stopping)
        sp_info("no longer active: %s", why);
    else
        sp_warn("no longer active: %s", why);
    s->active = false;
    s->epoch++;
    sched_listener_close(s);
}

static void on_unlock(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    (void)arg;
    if (err)
        sp_debug("releasing the leadership lock: %s", err);
}

static void become_active(struct sched *s)
{
    if (sched_listener_open(s) != 0) {
        /* Another process holds the port, for example: let a standby try. */
        sp_pgconn_query(s->lock, "SELECT pg_advisory_unlock(" SCHED_LOCK_KEY ")", 0, NULL,
                        on_unlock, NULL);
        return;
    }
    s->active = true;
    s->epoch++;
    sp_info("active: holding the scheduler lock; workers connect to %s:%d", s->cfg.listen_host,
            s->bound_port);
    sched_sweep(s);
}

static void on_try_lock(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct sched *s = arg;
    s->lock_inflight = false;
    if (s->stopping)
        return;
    if (err) {
        sp_debug("trying the scheduler lock: %s", err);
        return;
    }
    bool got = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    if (!got || s->active)
        return;
    if (!sp_pgconn_is_up(s->lock) || !sched_db_up(s)) {
        /* The lock may have come from a session that has since broken. */
        sp_pgconn_query(s->lock, "SELECT pg_advisory_unlock(" SCHED_LOCK_KEY ")", 0, NULL,
                        on_unlock, NULL);
        return;
    }
    become_active(s);
}

static void try_lock(struct sched *s)
{
    if (s->stopping || s->active || s->lock_inflight || !sp_pgconn_is_up(s->lock) ||
        !sched_db_up(s))
        return;
    if (sp_pgconn_query(s->lock, "SELECT pg_try_advisory_lock(" SCHED_LOCK_KEY ")", 0, NULL,
                        on_try_lock, s) == 0)
        s->lock_inflight = true;
}

static void on_lock_timer(uv_timer_t *t)
{
    try_lock(t->data);
}

static void on_lock_up(sp_pgconn_t *c, void *arg)
{
    (void)c;
    struct sched *s = arg;
    sp_info("lock connection ready; %s", s->active ? "active" : "standing by");
    try_lock(s);
}

static void on_lock_down(sp_pgconn_t *c, const char *err, void *arg)
{
    (void)c;
    struct sched *s = arg;
    s->lock_inflight = false;
    sched_step_down(s, err && *err ? err : "lost the connection that holds the scheduler lock");
}

int sched_leader_start(struct sched *s)
{
    struct sp_pgconn_opts o = {
        .backoff_base_ms = 100,
        .backoff_cap_ms = 1000,
        .connect_timeout_ms = 5000,
        .queue_wait_ms = 2000,
        .on_up = on_lock_up,
        .on_down = on_lock_down,
        .arg = s,
    };
    int rc = sp_pgconn_open(s->loop, s->cfg.dsn, &o, &s->lock);
    if (rc)
        return rc;
    uv_timer_init(s->loop, &s->lock_timer);
    s->lock_timer.data = s;
    uv_timer_start(&s->lock_timer, on_lock_timer, s->cfg.lock_retry_ms, s->cfg.lock_retry_ms);
    return 0;
}

void sched_leader_db_lost(struct sched *s, const char *err)
{
    if (!s->active)
        return;
    sched_step_down(s, err && *err ? err : "lost the work connection");
    sp_pgconn_query(s->lock, "SELECT pg_advisory_unlock(" SCHED_LOCK_KEY ")", 0, NULL, on_unlock,
                    NULL);
}

void sched_leader_db_up(struct sched *s)
{
    try_lock(s);
}

void sched_leader_stop(struct sched *s)
{
    sched_step_down(s, "shutting down");
    uv_timer_stop(&s->lock_timer);
    uv_close((uv_handle_t *)&s->lock_timer, NULL);
    if (s->lock)
        sp_pgconn_close(s->lock, NULL, NULL);
    s->lock = NULL;
}
