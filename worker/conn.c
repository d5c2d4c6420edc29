/*
 * The connection to the scheduler: one TCP connection carrying the wire
 * protocol (docs/protocol.md). REGISTER on every connect (quoting the worker
 * id after the first REGISTERED), HEARTBEAT every heartbeat_ms, and a
 * reconnect with capped exponential backoff and full jitter (sp_backoff)
 * whenever the connection ends, unless the worker is stopping. Shards keep
 * running while the connection is down: their results go to PostgreSQL,
 * fenced by their lease tokens; frames about them are dropped meanwhile.
 * Live requests do not outlive the connection that brought them: when it
 * ends, every one is cancelled (live.c).
 */
#include "worker.h"

#include "spool/error.h"
#include "spool/log.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void do_connect(struct worker *w);

static void free_handle(uv_handle_t *h)
{
    free(h);
}

static void on_reconnect(uv_timer_t *t)
{
    do_connect(t->data);
}

static void schedule_reconnect(struct worker *w)
{
    if (w->stopping || w->said_goodbye)
        return;
    unsigned ms = sp_backoff_next(&w->backoff);
    sp_debug("reconnecting to the scheduler in %u ms", ms);
    uv_timer_start(&w->reconnect_timer, on_reconnect, ms, 0);
}

static void send_register(struct worker *w)
{
    struct sp_wire_model m = {
        .name = w->model_name, .version = w->model_version, .digest = w->digest};
    struct sp_wire_frame f = {.type = SP_WIRE_REGISTER,
                              .reg = {.name = w->cfg.name,
                                      .gpu_type = w->cfg.gpu_type,
                                      .gpu_memory = 0,
                                      .capacity = w->cfg.capacity,
                                      .price_per_hour = w->cfg.price_per_hour,
                                      .models = w->eng ? &m : NULL,
                                      .n_models = w->eng ? 1 : 0,
                                      .max_batch = (uint32_t)w->cfg.max_batch,
                                      .backend = w->cfg.backend,
                                      .has_worker_id = w->has_id,
                                      .worker_id = w->worker_id}};
    if (sp_wire_conn_send(w->sc, &f))
        sp_warn("cannot send REGISTER to the scheduler");
}

static void on_heartbeat(uv_timer_t *t)
{
    struct worker *w = t->data;
    struct sp_wire_frame f = {.type = SP_WIRE_HEARTBEAT, .heartbeat = {.worker_id = w->worker_id}};
    wk_shards_load(w, &f.heartbeat);
    wk_conn_send(w, &f);
}

static void on_frame(sp_wire_conn_t *c, struct sp_wire_frame *f)
{
    struct worker *w = sp_wire_conn_data(c);
    switch (f->type) {
    case SP_WIRE_REGISTERED:
        w->registered = true;
        w->has_id = true;
        if (!w->exiting)
            w->draining = false; /* a DRAIN concerned the previous connection */
        w->worker_id = f->registered.worker_id;
        w->heartbeat_ms = f->registered.heartbeat_ms ? f->registered.heartbeat_ms : 1000;
        sp_backoff_reset(&w->backoff);
        sp_info("registered with the scheduler at %s as worker %" PRIu64, sp_wire_conn_peer(c),
                w->worker_id);
        uv_timer_start(&w->heartbeat_timer, on_heartbeat, 0, w->heartbeat_ms);
        break;
    case SP_WIRE_ASSIGN:
        wk_shard_assign(w, &f->assign);
        break;
    case SP_WIRE_REVOKE:
        wk_shard_revoke(w, &f->revoke);
        break;
    case SP_WIRE_DRAIN:
        sp_info("the scheduler asks to drain (%s, %u ms)", f->drain.reason, f->drain.deadline_ms);
        wk_drain_shards(w, f->drain.reason);
        break;
    case SP_WIRE_GOODBYE:
        sp_info("the scheduler said goodbye (%s)", f->goodbye.reason);
        sp_wire_conn_close(c);
        break;
    case SP_WIRE_LIVE_REQUEST:
        wk_live_request(w, &f->live);
        break;
    case SP_WIRE_CANCEL:
        wk_live_cancel(w, f->cancel.request_id);
        break;
    case SP_WIRE_ERROR:
        sp_warn("the scheduler reports %s: %s", f->error.code, f->error.message);
        break;
    default:
        sp_debug("ignoring %s from the scheduler", sp_wire_type_name(f->type));
        break;
    }
}

static void on_close(sp_wire_conn_t *c, int err)
{
    struct worker *w = sp_wire_conn_data(c);
    if (err && !w->stopping)
        sp_warn("scheduler connection closed: %s", sp_wire_conn_reason(c));
    free(w->tcp);
    w->tcp = NULL;
    w->sc = NULL;
    w->registered = false;
    uv_timer_stop(&w->heartbeat_timer);
    /* Live requests stream to this connection only: nobody can receive them now. */
    if (!w->stopping) {
        wk_live_end_all(w, NULL, "the scheduler connection closed");
        wk_shards_kick(w); /* delivers the cancelled sequences' events */
    }
    schedule_reconnect(w);
}

static void on_connect(uv_connect_t *req, int status)
{
    struct worker *w = req->data;
    if (status == UV_ECANCELED)
        return; /* wk_conn_close closed the handle */
    if (status < 0) {
        sp_warn("cannot connect to the scheduler at %s: %s", w->cfg.scheduler, uv_strerror(status));
        uv_close((uv_handle_t *)w->tcp, free_handle);
        w->tcp = NULL;
        schedule_reconnect(w);
        return;
    }
    if (sp_wire_conn_open(&w->sc, (uv_stream_t *)w->tcp, 0, on_frame, on_close, w)) {
        uv_close((uv_handle_t *)w->tcp, free_handle);
        w->tcp = NULL;
        schedule_reconnect(w);
        return;
    }
    send_register(w);
}

static void do_connect(struct worker *w)
{
    if (w->stopping || w->tcp)
        return;
    char host[256];
    const char *colon = strrchr(w->cfg.scheduler, ':');
    if (!colon || (size_t)(colon - w->cfg.scheduler) >= sizeof(host)) {
        sp_error("--scheduler '%s' is not host:port", w->cfg.scheduler);
        return;
    }
    memcpy(host, w->cfg.scheduler, (size_t)(colon - w->cfg.scheduler));
    host[colon - w->cfg.scheduler] = 0;
    uv_getaddrinfo_t gai;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    int rc = uv_getaddrinfo(w->loop, &gai, NULL, host, colon + 1, &hints);
    if (rc) {
        sp_warn("cannot resolve the scheduler %s: %s", w->cfg.scheduler, uv_strerror(rc));
        schedule_reconnect(w);
        return;
    }
    w->tcp = malloc(sizeof(*w->tcp));
    if (!w->tcp) {
        uv_freeaddrinfo(gai.addrinfo);
        schedule_reconnect(w);
        return;
    }
    uv_tcp_init(w->loop, w->tcp);
    uv_tcp_nodelay(w->tcp, 1);
    w->connect_req.data = w;
    rc = uv_tcp_connect(&w->connect_req, w->tcp, gai.addrinfo->ai_addr, on_connect);
    uv_freeaddrinfo(gai.addrinfo);
    if (rc) {
        sp_warn("cannot connect to the scheduler at %s: %s", w->cfg.scheduler, uv_strerror(rc));
        uv_close((uv_handle_t *)w->tcp, free_handle);
        w->tcp = NULL;
        schedule_reconnect(w);
    }
}

void wk_conn_start(struct worker *w)
{
    sp_backoff_init(&w->backoff, 100, 5000, (uint64_t)getpid() * 0x9E3779B97F4A7C15ull);
    uv_timer_init(w->loop, &w->reconnect_timer);
    uv_timer_init(w->loop, &w->heartbeat_timer);
    w->reconnect_timer.data = w->heartbeat_timer.data = w;
    do_connect(w);
}

void wk_conn_send(struct worker *w, const struct sp_wire_frame *f)
{
    if (!w->sc || !w->registered) {
        sp_debug("not connected to the scheduler: %s dropped", sp_wire_type_name(f->type));
        return;
    }
    int rc = sp_wire_conn_send(w->sc, f);
    if (rc)
        sp_warn("cannot send %s to the scheduler: %s", sp_wire_type_name(f->type), sp_strerror(rc));
}

void wk_conn_goodbye(struct worker *w, const char *reason)
{
    struct sp_wire_frame f = {.type = SP_WIRE_GOODBYE, .goodbye = {.reason = reason}};
    wk_conn_send(w, &f);
    w->said_goodbye = true; /* no reconnect after this */
    if (w->sc)
        sp_wire_conn_shutdown(w->sc);
}

void wk_conn_close(struct worker *w)
{
    uv_timer_stop(&w->reconnect_timer);
    uv_timer_stop(&w->heartbeat_timer);
    if (w->sc)
        sp_wire_conn_close(w->sc);
    else if (w->tcp) {
        /* Still connecting: closing the handle cancels the connect (UV_ECANCELED). */
        uv_close((uv_handle_t *)w->tcp, free_handle);
        w->tcp = NULL;
    }
    if (!uv_is_closing((uv_handle_t *)&w->reconnect_timer)) {
        uv_close((uv_handle_t *)&w->reconnect_timer, NULL);
        uv_close((uv_handle_t *)&w->heartbeat_timer, NULL);
    }
}
