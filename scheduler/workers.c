/*
 * The worker side of the scheduler: the listener (open only while active)
 * and what each frame from a worker does (docs/protocol.md):
 *
 *   REGISTER   must come first; spool.register_worker (a reconnect quoting
 *              its worker_id keeps its row), then REGISTERED {worker_id,
 *              heartbeat_ms, lease_ttl_ms}
 *   HEARTBEAT  spool.renew_leases(worker, ttl); free_slots and the time
 *              are kept (a worker that misses three heartbeats gets no new work)
 *   PROGRESS   logged
 *   DONE       spool.release_shard(shard, token, 'done'), then a sweep
 *   RELEASE    spool.release_shard(shard, token, reason), then a sweep; a
 *              worker may also release the shard itself: the second release
 *              then finds the lease gone, which is fine
 *   DRAIN      the worker takes nothing more; spool.worker_draining records
 *              the notice in spool.preemptions with the DRAIN's reason
 *   GOODBYE    spool.worker_gone; GOODBYE back, then shut down
 *   TOKENS, and USAGE or ERROR naming a live request: live.c
 *   USAGE, ERROR (others)  logged (cost accounting is elsewhere)
 *
 * HEARTBEAT, PROGRESS, DONE, RELEASE, DRAIN and a shard's USAGE also feed
 * the metrics (metrics.h).
 *
 * A frame only the scheduler may send, any frame before REGISTER, or any
 * frame while REGISTER is being recorded is answered with ERROR SP_EPROTO
 * and the connection is closed. A connection that ends without GOODBYE
 * marks the worker gone too; its leases are left to expire (it may still
 * be alive and writing, which its lease token makes safe).
 */
#include "scheduler.h"
#include "metrics.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "live.h"
#include "spool/error.h"
#include "spool/log.h"

void sched_worker_ref(struct sched_worker *w)
{
    w->refs++;
}

void sched_worker_unref(struct sched_worker *w)
{
    if (--w->refs > 0)
        return;
    for (size_t i = 0; i < w->n_digests; i++)
        free(w->digests[i]);
    free(w->digests);
    free(w);
}

struct sched_worker *sched_worker_find(struct sched *s, int64_t id)
{
    for (struct sched_worker *w = s->workers; w; w = w->next)
        if (w->id == id && w->conn)
            return w;
    return NULL;
}

void sched_worker_add_digest(struct sched_worker *w, const char *digest)
{
    for (size_t i = 0; i < w->n_digests; i++)
        if (strcmp(w->digests[i], digest) == 0)
            return;
    char **d = realloc(w->digests, (w->n_digests + 1) * sizeof *d);
    if (!d)
        return;
    w->digests = d;
    if ((d[w->n_digests] = strdup(digest)) != NULL)
        w->n_digests++;
}

/* Sends ERROR {code, message} and closes the connection. */
static void fail_worker(struct sched_worker *w, int code, const char *msg)
{
    sp_warn("worker %s (%s): %s", w->name[0] ? w->name : "?", sp_wire_conn_peer(w->conn), msg);
    struct sp_wire_frame f = {.type = SP_WIRE_ERROR};
    f.error = (struct sp_wire_error){.code = sp_err_name(code), .message = msg};
    sp_wire_conn_send(w->conn, &f);
    sp_wire_conn_close(w->conn);
}

/* A callback's context: the worker (referenced) and the epoch it was sent in. */
struct wctx {
    struct sched_worker *w;
    uint64_t epoch;
    char what[64];
};

static struct wctx *wctx_new(struct sched_worker *w, const char *what)
{
    struct wctx *x = malloc(sizeof *x);
    if (!x)
        return NULL;
    sched_worker_ref(w);
    x->w = w;
    x->epoch = w->s->epoch;
    snprintf(x->what, sizeof x->what, "%s", what);
    return x;
}

static void wctx_free(struct wctx *x)
{
    sched_worker_unref(x->w);
    free(x);
}

/* A query whose result only matters when it fails. */
static void on_logged(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    (void)res;
    struct wctx *x = arg;
    if (err && x->w->s->stopping)
        sp_debug("worker %" PRId64 ": %s: %s", x->w->id, x->what, err);
    else if (err)
        sp_warn("worker %" PRId64 ": %s: %s", x->w->id, x->what, err);
    wctx_free(x);
}

static void query_for(struct sched_worker *w, const char *what, const char *sql, int n,
                      const char *const *p, sp_pgconn_result_cb cb)
{
    struct wctx *x = wctx_new(w, what);
    if (!x)
        return;
    if (sp_pgconn_query(w->s->db, sql, n, p, cb ? cb : on_logged, x) != 0)
        wctx_free(x);
}

static void record_gone(struct sched_worker *w)
{
    struct sched *s = w->s;
    /* Only an active scheduler speaks for its workers: after a step-down the
     * worker may already have registered with the new active one. */
    if (w->id == 0 || w->gone_recorded || !s->active || s->stopping || !sched_db_up(s))
        return;
    w->gone_recorded = true;
    char id[24];
    snprintf(id, sizeof id, "%" PRId64, w->id);
    const char *p[] = {id};
    query_for(w, "marking it gone", "SELECT spool.worker_gone($1)", 1, p, NULL);
}

static void on_registered(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct wctx *x = arg;
    struct sched_worker *w = x->w;
    struct sched *s = w->s;
    if (!w->conn || x->epoch != s->epoch || !s->active) {
        wctx_free(x);
        return;
    }
    if (err) {
        char msg[512];
        snprintf(msg, sizeof msg, "could not register worker '%s': %s; reconnect later", w->name,
                 err);
        fail_worker(w, SP_EDB, msg);
        wctx_free(x);
        return;
    }
    w->id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    /* A worker that reconnected before its old connection was seen to end:
     * the old one goes, without marking the (now re-registered) row gone. */
    for (struct sched_worker *o = s->workers; o; o = o->next) {
        if (o != w && o->id == w->id && o->conn) {
            sp_info("worker %" PRId64 ": a new connection replaces the one from %s", w->id,
                    sp_wire_conn_peer(o->conn));
            o->gone_recorded = true;
            o->state = SW_DRAINING;
            sp_wire_conn_close(o->conn);
        }
    }
    w->state = SW_ACTIVE;
    w->last_beat = uv_now(s->loop);
    struct sp_wire_frame f = {.type = SP_WIRE_REGISTERED};
    f.registered =
        (struct sp_wire_registered){(uint64_t)w->id, s->cfg.heartbeat_ms, s->cfg.lease_ttl_ms};
    sp_wire_conn_send(w->conn, &f);
    sp_info("worker %" PRId64 " '%s' registered from %s (max_batch %u, %zu model%s)", w->id,
            w->name, sp_wire_conn_peer(w->conn), w->max_batch, w->n_digests,
            w->n_digests == 1 ? "" : "s");
    wctx_free(x);
    sched_sweep(s);
}

static void handle_register(struct sched_worker *w, const struct sp_wire_register *r)
{
    snprintf(w->name, sizeof w->name, "%s", r->name);
    w->max_batch = r->max_batch;
    w->capacity = r->capacity;
    json_t *models = json_array();
    for (uint32_t i = 0; i < r->n_models; i++) {
        json_array_append_new(models, json_pack("{s:s, s:i, s:s}", "name", r->models[i].name,
                                                "version", (json_int_t)r->models[i].version,
                                                "digest", r->models[i].digest));
        sched_worker_add_digest(w, r->models[i].digest);
    }
    char *models_json = json_dumps(models, JSON_COMPACT);
    json_decref(models);
    char id[24], mem[24], price[40];
    snprintf(id, sizeof id, "%" PRIu64, r->worker_id);
    snprintf(mem, sizeof mem, "%" PRIu64, r->gpu_memory);
    snprintf(price, sizeof price, "%.17g", r->price_per_hour);
    const char *p[] = {
        r->has_worker_id ? id : NULL,       r->name, r->gpu_type, mem,
        sp_wire_capacity_name(r->capacity), price,   r->backend,  models_json ? models_json : "[]"};
    w->state = SW_REGISTERING;
    query_for(w, "registering", "SELECT spool.register_worker($1, $2, $3, $4, $5, $6, $7, $8)", 8,
              p, on_registered);
    free(models_json);
}

static void on_released(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    (void)c;
    struct wctx *x = arg;
    struct sched *s = x->w->s;
    if (err && res && strstr(err, "lease lost"))
        sp_debug("worker %" PRId64 ": %s: already released (%s)", x->w->id, x->what, err);
    else if (err)
        sp_warn("worker %" PRId64 ": %s: %s", x->w->id, x->what, err);
    else
        sp_info("worker %" PRId64 ": %s: shard is %s", x->w->id, x->what, PQgetvalue(res, 0, 0));
    wctx_free(x);
    sched_sweep(s);
}

static void release(struct sched_worker *w, uint64_t shard, uint64_t token, const char *reason)
{
    char sid[24], tok[24], what[64];
    snprintf(sid, sizeof sid, "%" PRIu64, shard);
    snprintf(tok, sizeof tok, "%" PRIu64, token);
    snprintf(what, sizeof what, "releasing shard %" PRIu64, shard);
    const char *p[] = {sid, tok, reason};
    query_for(w, what, "SELECT spool.release_shard($1, $2, $3)", 3, p, on_released);
}

static void on_frame(sp_wire_conn_t *c, struct sp_wire_frame *f)
{
    struct sched_worker *w = sp_wire_conn_data(c);
    struct sched *s = w->s;
    char msg[256];
    if (!(sp_wire_type_senders(f->type) & SP_WIRE_FROM_WORKER)) {
        snprintf(msg, sizeof msg, "%s is sent by the scheduler, never by a worker",
                 sp_wire_type_name(f->type));
        fail_worker(w, SP_EPROTO, msg);
        return;
    }
    if (w->state == SW_NEW && f->type != SP_WIRE_REGISTER) {
        snprintf(msg, sizeof msg, "the first frame must be REGISTER, got %s",
                 sp_wire_type_name(f->type));
        fail_worker(w, SP_EPROTO, msg);
        return;
    }
    if (w->state == SW_REGISTERING || (w->state != SW_NEW && f->type == SP_WIRE_REGISTER)) {
        snprintf(msg, sizeof msg, "%s before REGISTERED or a second REGISTER: wait for REGISTERED",
                 sp_wire_type_name(f->type));
        fail_worker(w, SP_EPROTO, msg);
        return;
    }
    if (w->state != SW_NEW && sched_live_frame(s, w, f))
        return; /* a live request's TOKENS, USAGE or ERROR */
    char id[24], a[24], b[64];
    snprintf(id, sizeof id, "%" PRId64, w->id);
    switch (f->type) {
    case SP_WIRE_REGISTER:
        handle_register(w, &f->reg);
        break;
    case SP_WIRE_HEARTBEAT: {
        if (f->heartbeat.worker_id != (uint64_t)w->id) {
            snprintf(msg, sizeof msg, "HEARTBEAT names worker %" PRIu64 ", this connection is %s",
                     f->heartbeat.worker_id, id);
            fail_worker(w, SP_EPROTO, msg);
            return;
        }
        w->free_slots = f->heartbeat.free_slots;
        w->kv_blocks_free = f->heartbeat.kv_blocks_free;
        w->kv_blocks_total = f->heartbeat.kv_blocks_total;
        w->running = f->heartbeat.running;
        w->queued = f->heartbeat.queued;
        w->last_beat = uv_now(s->loop);
        const char *p[] = {id, s->ttl_interval};
        query_for(w, "renewing leases", "SELECT spool.renew_leases($1, $2::interval)", 2, p, NULL);
        break;
    }
    case SP_WIRE_PROGRESS:
        sp_debug("worker %s: shard %" PRIu64 ": %" PRIu64 " requests done, %" PRIu64 " tokens", id,
                 f->progress.shard_id, f->progress.requests_done, f->progress.tokens_out);
        sched_metrics_shard_progress(s, w->id, f->progress.shard_id, f->progress.tokens_out);
        break;
    case SP_WIRE_DONE:
        sp_info("worker %s: shard %" PRIu64 " done (%" PRIu64 " succeeded, %" PRIu64 " failed)", id,
                f->done.shard_id, f->done.succeeded, f->done.failed);
        sched_metrics_shard_end(s, w->id, f->done.shard_id, f->done.succeeded, f->done.failed);
        release(w, f->done.shard_id, f->done.lease_token, "done");
        break;
    case SP_WIRE_RELEASE:
        sp_info("worker %s: gives back shard %" PRIu64 " (%s)", id, f->release.shard_id,
                f->release.reason);
        sched_metrics_shard_end(s, w->id, f->release.shard_id, 0, 0);
        release(w, f->release.shard_id, f->release.lease_token, f->release.reason);
        break;
    case SP_WIRE_DRAIN: {
        sp_info("worker %s: draining (%s, %u ms)", id, f->drain.reason, f->drain.deadline_ms);
        w->state = SW_DRAINING;
        sched_metrics_preemption(s, f->drain.reason);
        const char *p[] = {id, f->drain.reason};
        query_for(w, "recording its preemption", "SELECT spool.worker_draining($1, $2)", 2, p,
                  NULL);
        break;
    }
    case SP_WIRE_GOODBYE: {
        sp_info("worker %s: goodbye (%s)", id, f->goodbye.reason);
        record_gone(w);
        w->state = SW_DRAINING;
        struct sp_wire_frame g = {.type = SP_WIRE_GOODBYE};
        g.goodbye.reason = "";
        sp_wire_conn_send(c, &g);
        sp_wire_conn_shutdown(c);
        break;
    }
    case SP_WIRE_USAGE:
        snprintf(a, sizeof a, "%" PRIu64, f->usage.tokens_in);
        snprintf(b, sizeof b, "%" PRIu64, f->usage.tokens_out);
        sp_debug("worker %s: usage: %s tokens in, %s out, %.3f GPU s", id, a, b,
                 f->usage.gpu_seconds);
        if (f->usage.has_shard_id)
            sched_metrics_shard_usage(s, w->id, f->usage.shard_id, f->usage.tokens_in,
                                      f->usage.tokens_out);
        break;
    case SP_WIRE_ERROR:
        sp_warn("worker %s reports %s: %s", id, f->error.code, f->error.message);
        break;
    default:
        sp_debug("worker %s: %s ignored", id, sp_wire_type_name(f->type));
        break;
    }
}

static void on_conn_close(sp_wire_conn_t *c, int err)
{
    struct sched_worker *w = sp_wire_conn_data(c);
    struct sched *s = w->s;
    if (w->id)
        sp_info("worker %" PRId64 " '%s' disconnected%s%s", w->id, w->name, err ? ": " : "",
                err ? sp_wire_conn_reason(c) : "");
    record_gone(w);
    w->conn = NULL;
    w->state = SW_CLOSED;
    sched_live_worker_lost(s, w);
    if (w->prev)
        w->prev->next = w->next;
    else if (s->workers == w)
        s->workers = w->next;
    if (w->next)
        w->next->prev = w->prev;
    w->prev = w->next = NULL;
    free(w->tcp);
    w->tcp = NULL;
    sched_worker_unref(w);
}

static void free_handle(uv_handle_t *h)
{
    free(h);
}

static void on_connection(uv_stream_t *server, int status)
{
    struct sched *s = server->data;
    if (status < 0) {
        sp_warn("accepting a worker: %s", uv_strerror(status));
        return;
    }
    struct sched_worker *w = calloc(1, sizeof *w);
    uv_tcp_t *tcp = malloc(sizeof *tcp);
    if (!w || !tcp || uv_tcp_init(s->loop, tcp) != 0) {
        free(w);
        free(tcp);
        return;
    }
    if (uv_accept(server, (uv_stream_t *)tcp) != 0 || !s->active) {
        uv_close((uv_handle_t *)tcp, free_handle);
        free(w);
        return;
    }
    uv_tcp_nodelay(tcp, 1);
    w->s = s;
    w->tcp = tcp;
    w->refs = 1;
    if (sp_wire_conn_open(&w->conn, (uv_stream_t *)tcp, 0, on_frame, on_conn_close, w) != 0) {
        uv_close((uv_handle_t *)tcp, free_handle);
        free(w);
        return;
    }
    w->next = s->workers;
    if (s->workers)
        s->workers->prev = w;
    s->workers = w;
    sp_debug("worker connected from %s", sp_wire_conn_peer(w->conn));
}

static int write_port_file(struct sched *s)
{
    if (!s->cfg.port_file)
        return 0;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", s->cfg.port_file);
    FILE *fp = fopen(tmp, "w");
    if (!fp)
        return SP_EIO;
    fprintf(fp, "%d\n", s->bound_port);
    if (fclose(fp) != 0 || rename(tmp, s->cfg.port_file) != 0) {
        unlink(tmp);
        return SP_EIO;
    }
    return 0;
}

int sched_listener_open(struct sched *s)
{
    struct sockaddr_storage addr;
    const char *host = s->cfg.listen_host;
    int rc = strchr(host, ':') ? uv_ip6_addr(host, s->cfg.listen_port, (struct sockaddr_in6 *)&addr)
                               : uv_ip4_addr(host, s->cfg.listen_port, (struct sockaddr_in *)&addr);
    uv_tcp_t *l = malloc(sizeof *l);
    if (rc != 0 || !l) {
        sp_error("worker listener: bad address %s:%d", host, s->cfg.listen_port);
        free(l);
        return SP_EIO;
    }
    uv_tcp_init(s->loop, l);
    l->data = s;
    if ((rc = uv_tcp_bind(l, (struct sockaddr *)&addr, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)l, 128, on_connection)) != 0) {
        sp_error("worker listener on %s:%d: %s; will retry", host, s->cfg.listen_port,
                 uv_strerror(rc));
        uv_close((uv_handle_t *)l, free_handle);
        return SP_EIO;
    }
    struct sockaddr_storage bound;
    int len = sizeof bound;
    uv_tcp_getsockname(l, (struct sockaddr *)&bound, &len);
    s->bound_port = bound.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&bound)->sin6_port)
                                                : ntohs(((struct sockaddr_in *)&bound)->sin_port);
    s->listener = l;
    /* With --listen HOST:0 the port is chosen once: after stepping down
     * (PostgreSQL restarted, lock lost) the listener reopens on the same
     * port, the one the workers already dial. */
    if (s->cfg.listen_port == 0)
        s->cfg.listen_port = s->bound_port;
    if (write_port_file(s) != 0)
        sp_error("cannot write the port file %s", s->cfg.port_file);
    /* A machine-readable line for whoever started us. */
    sp_info("listening port=%d", s->bound_port);
    return 0;
}

void sched_listener_close(struct sched *s)
{
    if (s->listener) {
        uv_close((uv_handle_t *)s->listener, free_handle);
        s->listener = NULL;
        if (s->cfg.port_file)
            unlink(s->cfg.port_file);
    }
    for (struct sched_worker *w = s->workers; w; w = w->next)
        if (w->conn)
            sp_wire_conn_close(w->conn);
}
