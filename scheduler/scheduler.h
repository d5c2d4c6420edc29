/*
 * spool-scheduler's shared state and the functions its files offer each
 * other. Everything runs on one libuv loop; nothing here is thread-safe.
 *
 * Files:
 *   main.c       flags, the loop, signals, orderly shutdown
 *   leader.c     the leadership lock and the standby/active role
 *   db.c         the work connection: LISTEN/NOTIFY, cancellations
 *   sweep.c      the periodic sweep: expire leases, plan, place, lease, ASSIGN
 *   placement.c  the placement policy (pure)
 *   workers.c    the worker listener and what each frame does
 *   http.c       the HTTP front (http.h), served in every role
 *   auth.c       API key checks for the HTTP front (auth.h)
 *   models.c     GET /v1/models
 *   live.c       the live lane: completions, routing to workers, TOKENS relay
 *
 * Roles (leader.c is the only writer of s->active):
 *
 *   standby --pg_try_advisory_lock true, listener open--> active
 *   active --lock connection lost, work connection lost, listen failed--> standby
 *
 * Only an active scheduler listens for workers, plans and places. Each change
 * of role bumps s->epoch; a database callback started under another epoch
 * does nothing, so that a scheduler that stepped down never acts on a
 * result it asked for while it was active.
 */
#ifndef SPOOL_SCHEDULER_H
#define SPOOL_SCHEDULER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "spool/pg.h"
#include "spool/wire_conn.h"

/* The advisory lock key that elects the active scheduler ("spool-sched"). */
#define SCHED_LOCK_KEY "7310593858412014692"

struct sched_config {
    const char *dsn;
    char listen_host[256];
    int listen_port;         /* 0: the kernel picks one */
    const char *port_file;   /* NULL, or where the bound port is written while active */
    unsigned heartbeat_ms;   /* told to workers in REGISTERED */
    unsigned lease_ttl_ms;   /* lease length; renewed by each HEARTBEAT */
    unsigned sweep_ms;       /* period of the sweep */
    unsigned lock_retry_ms;  /* how often a standby tries the lock */
    int shard_size;          /* requests per shard for plan_shards */
    unsigned fill;           /* a worker's target load is fill x max_batch requests */
    unsigned max_candidates; /* pending shards considered per sweep */
};

enum sched_worker_state {
    SW_NEW,         /* connected; REGISTER expected */
    SW_REGISTERING, /* REGISTER received; waiting for the database */
    SW_ACTIVE,      /* registered; takes work */
    SW_DRAINING,    /* sent DRAIN; takes nothing more */
    SW_CLOSED,      /* connection closed; kept while callbacks hold references */
};

/* One worker connection. Freed when closed and no callback holds a reference. */
struct sched_worker {
    struct sched *s;
    struct sched_worker *prev, *next; /* s->workers, while the connection is open */
    uv_tcp_t *tcp;                    /* freed in the conn's close callback */
    sp_wire_conn_t *conn;             /* NULL once closed */
    int refs;                         /* 1 for the connection + 1 per pending callback */
    enum sched_worker_state state;
    bool gone_recorded; /* worker_gone was queued */
    int64_t id;         /* spool.workers.id once registered, else 0 */
    char name[128];
    uint32_t max_batch;
    uint32_t free_slots; /* from the last HEARTBEAT */
    uint64_t last_beat;  /* uv_now() of REGISTERED or the last HEARTBEAT, ms */
    char **digests;      /* loaded models ("sha256:<hex>"), owned */
    size_t n_digests;
    int64_t load;           /* requests leased to it, from the last sweep plus placements since */
    uint32_t live_inflight; /* live requests sent to it and not finished (live.c) */
    /* For the metrics: capacity from REGISTER, the rest from the last HEARTBEAT. */
    enum sp_wire_capacity capacity;
    uint32_t kv_blocks_free, kv_blocks_total, running, queued;
};

struct sched {
    uv_loop_t *loop;
    struct sched_config cfg;
    char ttl_interval[32]; /* lease_ttl_ms as an SQL interval literal */

    sp_pgconn_t *db;   /* work connection: queries, LISTEN */
    sp_pgconn_t *lock; /* holds the leadership lock for its session */
    /*
     * The Batch API's own connection (oai_batch.c) and the sweep's
     * finalize_batches: a create_batch over a big file takes seconds, and on
     * the work connection it would hold up sweeps and every other query.
     */
    sp_pgconn_t *batchdb;
    bool finalizing; /* a finalize_batches is queued on batchdb */
    bool active;
    uint64_t epoch;
    bool lock_inflight;
    uv_timer_t lock_timer;

    uv_tcp_t *listener; /* while active; freed in its close callback */
    int bound_port;
    struct sched_worker *workers;

    uv_timer_t sweep_timer;
    bool sweeping, sweep_again;

    struct sched_rate *rate;       /* ratelimit.c: per-key token buckets, made on first use */
    struct sched_livelog *livelog; /* livelog.c: the live-request log, from sched_livelog_init */

    bool stopping;
    bool schema_checked; /* the work connection found 0004's functions once */
    int exit_code;       /* main's return value: 0, or 1 after a fatal setup error */
    uv_signal_t sigs[2]; /* SIGTERM, SIGINT */

    struct sh_server *http;  /* the HTTP front (http.c), every role */
    struct sched_auth *auth; /* API key cache (auth.c) */
    struct live_state *live; /* live requests in flight (live.c) */
    /* metrics.c's state (metrics.h); NULL before sched_metrics_init. */
    struct sched_metrics *metrics;
};

/* main.c */
/* Stops everything; uv_run returns once every handle has closed. Idempotent. */
void sched_shutdown(struct sched *s, int exit_code);

/* leader.c */
int sched_leader_start(struct sched *s);
/* Gives up the active role (if held): closes the listener and drops every worker. */
void sched_step_down(struct sched *s, const char *why);
void sched_leader_stop(struct sched *s);
/* The work connection broke: step down and unlock, so that a standby can take over. */
void sched_leader_db_lost(struct sched *s, const char *err);
/* The work connection is ready: a standby tries the lock at once. */
void sched_leader_db_up(struct sched *s);

/* db.c */
int sched_db_open(struct sched *s);
void sched_db_close(struct sched *s);
/* True while the work connection is ready. */
bool sched_db_up(const struct sched *s);

/* sweep.c */
int sched_sweep_init(struct sched *s);
/* Runs a sweep now, or right after the one in progress. */
void sched_sweep(struct sched *s);
void sched_sweep_stop(struct sched *s);

/* workers.c */
/* Binds and listens on cfg.listen; writes the port file. Returns 0 or SP_EIO. */
int sched_listener_open(struct sched *s);
/* Closes the listener, every worker connection, and removes the port file. */
void sched_listener_close(struct sched *s);
struct sched_worker *sched_worker_find(struct sched *s, int64_t id);
void sched_worker_ref(struct sched_worker *w);
void sched_worker_unref(struct sched_worker *w);
/* Adds a model digest to the worker's loaded set (it loads what it is assigned). */
void sched_worker_add_digest(struct sched_worker *w, const char *digest);

#endif
